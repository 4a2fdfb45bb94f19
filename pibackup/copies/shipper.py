"""One shipping round: bring the remote copy in step with the backup directory as it is now,
through a Transport, in the order that keeps every copy cut short restorable.

- Closed segments and snapshots never change: each is sent once.
- The open segment grows in place inside zeros written ahead (preallocation), which
  rsync --append cannot follow, so its valid part is copied to a staging file under
  DEST/.ship that only ever grows, and that file is sent with --append-verify.
- With a key (pibackup-ship-encrypt-key) every file is sent as an encrypted staging
  copy (crypt.py) that also only ever grows by whole chunks.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable, Dict, List, Optional, Tuple

from pibackup.copies.crypt import NO_NODE_ID, CryptError
from pibackup.copies.head import HeadError, HeadMaker, read_head
from pibackup.copies.staging import Staging
from pibackup.copies.state import BadState, FileState, load_state, save_state
from pibackup.copies.target import ShipConfig, ShipError
from pibackup.copies.transport import Transport
from pibackup.errors import PibackupError
from pibackup.store import directory as dst
from pibackup.store.layout import EMERGENCY_RECOVER, GENERATION_PREFIX, HEAD, MARKER, STATE_FILE, TOP_FILES, is_generation_name
from pibackup.store.segment import HEADER_SIZE, decode_header

Log = Callable[[str, str], None]
OpenSegment = Callable[[], Optional[Tuple[str, int]]]
Inventory = List[Tuple[str, str, int, bool]]  # (relative path, path, length to ship, closed)


def _group(rel: str, sent: bool) -> str:
    """Which call of a round sends a closed file: the ones partly sent already go together;
    a new one with its generation, its snapshot ("gen-000002/0") before its segments ("/1")."""
    if sent or "/" not in rel:
        return ""
    gen, name = rel.split("/", 1)
    return f"{gen}/{0 if name.startswith('snapshot-') else 1}"


def top_files(destination: str, files: Dict[str, FileState], staging: Staging, seen: Dict[str, Tuple[int, int, int]]) -> Inventory:
    """NODE and emergency.recover: closed files, but emergency.recover is replaced whole
    whenever lightningd rewrites it. A new version (and, after a restart, the one there: it
    may have changed after the last round) is sent anew, whole, through a temporary file the
    remote renames into place. A file replaced while it was sent is sent again at the next
    round. `seen`: (inode, size, mtime) of each as last listed, kept between rounds."""
    out: Inventory = []
    for name in TOP_FILES:
        path = os.path.join(destination, name)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        now = (st.st_ino, st.st_size, st.st_mtime_ns)
        before, seen[name] = seen.get(name), now
        if before != now and name in files and (before is not None or name == EMERGENCY_RECOVER):
            staging.drop(name)
            files[name] = FileState()
        out.append((name, path, st.st_size, True))
    return out


def whose_copy(head: Optional[HeadMaker], destination: str, theirs: Optional[bytes]) -> str:
    """For the refusal of a remote directory: the node its head record names, when not ours."""
    if head is None:
        return ""
    ours = head.node_id(dst.Destination(destination).newest())
    if theirs is None or theirs == NO_NODE_ID or ours == NO_NODE_ID or theirs == ours:
        return ""
    return f": it is the copy of node {theirs.hex()}, and this backup is of node {ours.hex()}; nothing there was changed"


class ShipRound:
    """What a round needs between rounds: each file's shipping state, the generation ids
    shipped, whether the remote directory was found to be ours."""

    def __init__(
        self, cfg: ShipConfig, destination: str, open_segment: OpenSegment, log: Log, transport: Transport, staging: Staging
    ):
        self.cfg = cfg
        self.destination = destination
        self.open_segment = open_segment
        self.log = log
        self.transport = transport
        self.staging = staging
        self.files: Dict[str, FileState] = {}
        self.generation_ids: Dict[str, str] = {}  # gen-NNNNNN -> generation id shipped under that name
        self.remote_checked = False
        self.head: Optional[HeadMaker] = None  # made at open(): it needs the staging directory
        self.files_sent = 0
        self.remote_node: Optional[bytes] = None  # the node id the remote head record named, when one was read
        self.top_seen: Dict[str, Tuple[int, int, int]] = {}  # NODE, emergency.recover -> (inode, size, mtime) as listed

    def open(self) -> None:
        self.head = self.staging.open()
        self._load_state()

    def run(self, retrying: bool) -> None:
        """Bring the remote copy in step with the local directory as it is now."""
        if not self.remote_checked:
            self._check_remote()
        elif retrying and self.cfg.key is not None:
            # While the host is away, encrypted copies are not staged on the stick again and
            # again: one login first says whether it is back. (Skipping the staging of closed
            # files instead let a round send a journal without the snapshot before it.)
            self.transport.list()
        inventory = self._inventory()
        # (closed, root, append, group) -> files. Closed files go first, so the remote never
        # holds a newer segment after an unfinished older one, whatever call fails. New closed
        # files go a generation at a time, its snapshot before its segments (rsync sends one
        # call's files in name order, and "seg-" sorts before "snapshot-"): a copy cut short
        # never holds a journal without the snapshot it starts from.
        batches: Dict[Tuple[bool, str, bool, str], List[str]] = {}
        for rel, path, length, closed in inventory:
            st = self.files.setdefault(rel, FileState())
            if st.done:
                continue
            if closed and (self.cfg.key is None or rel == MARKER):  # the marker is never encrypted
                # A closed plain file is sent from the backup directory itself; the remote
                # holds a prefix of it if it was staged while open.
                st.staged, st.final, st.unsent = length, True, True
                # Never sent: whole, through a temporary file the remote renames into place.
                # Partly sent while it was open: the rest appended.
                batches.setdefault((True, self.destination, st.sent, _group(rel, st.sent)), []).append(rel)
                continue
            self.staging.stage(rel, path, length, closed, st)
            if st.unsent:  # new now, or left over from a round that failed
                batches.setdefault((closed, self.staging.root, st.sent, _group(rel, st.sent) if closed else ""), []).append(rel)
        # Oldest first: closed before open; among closed files the ones already partly sent
        # (an older segment's last bytes) before new ones, and new ones by generation.
        for key in sorted(batches, key=lambda k: (not k[0], not k[2], k[3], k[1] != self.destination)):
            rels = batches[key]
            self.transport.send(key[1], rels, append=key[2], growing=not key[0])
            for rel in rels:
                st = self.files[rel]
                st.sent, st.unsent = True, False
                self.files_sent += 1
                if st.final:
                    st.done = True
                    self.staging.drop(rel)
        # The head record goes after the data it describes, and before any remote deletion:
        # a round cut short anywhere leaves a copy holding at least what its record says.
        self._ship_head()
        self._forget_old(inventory)
        self._save_state()

    def _inventory(self) -> Inventory:
        """(relative path, path, length to ship, closed) for the marker and every file of
        every complete generation. Only the writer's open segment is not closed."""
        d = dst.Destination(self.destination)
        out: Inventory = []
        marker = os.path.join(self.destination, MARKER)
        out.append((MARKER, marker, os.path.getsize(marker), True))
        out += top_files(self.destination, self.files, self.staging, self.top_seen)
        gens = self.staging.gens = d.generations()
        self._check_generation_ids(gens)
        if self.head is not None and gens and gens[-1].segments:
            # Before the open segment's length: the time shown for the copy's newest
            # transaction is then never later than it.
            try:
                self.head.newest_mtime = os.path.getmtime(gens[-1].segments[-1])
            except FileNotFoundError:
                self.head.newest_mtime = None
        open_seg = self.open_segment()  # after listing: a segment closed meanwhile counts as closed
        open_path = os.path.normpath(open_seg[0]) if open_seg is not None else None
        for g in gens:
            for path in g.snapshots + g.segments:
                rel = os.path.relpath(path, self.destination)
                if open_seg is not None and os.path.normpath(path) == open_path:
                    out.append((rel, path, open_seg[1], False))
                    continue
                try:
                    size = os.path.getsize(path)
                except FileNotFoundError:  # removed by retention meanwhile
                    continue
                out.append((rel, path, size, True))
        return out

    def _check_generation_ids(self, gens: List[dst.Generation]) -> None:
        """The same generation name must always mean the same generation: a new stick (or a
        recreated directory) starts again at gen-000001, and shipping it over the old copy
        would mix two histories, or delete the old copy's newer generations."""
        for g in gens:
            if not g.segments:
                continue
            try:
                with open(g.segments[0], "rb") as f:
                    gid = decode_header(f.read(HEADER_SIZE), g.segments[0]).generation_id.hex()
            except (OSError, PibackupError):
                continue  # verify's business; shipping sends what is there
            known = self.generation_ids.setdefault(g.name, gid)
            if known != gid:
                raise ShipError(
                    f"{g.path} is not the {g.name} already shipped to {self.cfg.target} (a new stick or a recreated "
                    "backup directory?). Nothing more is sent there, so the copy on it stays as it is: point "
                    "pibackup-ship at a new remote directory (keep the old one until the new one is complete)"
                )

    def _check_remote(self) -> None:
        """Once: the remote directory must be ours, new, or empty; never someone else's.
        Ours: only what this shipper sent, or a copy whose head record names our copy id
        (our shipping state was lost or discarded: everything is sent again)."""
        listed = self.transport.list()
        if listed is None:
            self.remote_checked = True  # rsync creates it with the first files
            return
        names = {e.name for e in listed}
        known = {MARKER, HEAD, *TOP_FILES} | {n.split("/")[0] for n in self.files}
        foreign = sorted(n for n in names if n not in known)
        if foreign and HEAD in names and all(is_generation_name(n) for n in foreign) and self._remote_is_ours():
            foreign = []
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise ShipError(
                f"the remote directory {self.cfg.target} holds files this pibackup did not ship ({shown})"
                f"{whose_copy(self.head, self.destination, self.remote_node)}; "
                "point pibackup-ship at an empty or new directory. If it is an earlier copy of this node (its shipping "
                "state in DEST/.ship was lost), rename it there and let a new copy complete before you delete it"
            )
        self.remote_checked = True

    def _remote_is_ours(self) -> bool:
        """Does the remote head record name this backup directory's copy id? Then its
        generation ids are taken as known: a new stick is still not shipped over it."""
        assert self.head is not None
        with tempfile.TemporaryDirectory(dir=self.staging.root) as tmp:
            fetched = self.transport.fetch(HEAD, tmp, 1 << 20)
            try:
                theirs = read_head(os.path.join(tmp, HEAD), self.cfg.key) if fetched else None
            except (OSError, HeadError, CryptError):
                theirs = None
        self.remote_node = theirs.node_id if theirs is not None else None
        if theirs is None or theirs.copy_id != self.head.copy_id:
            return False
        for name, g in theirs.generations.items():
            self.generation_ids.setdefault(name, g["id"])
        self.log(f"pibackup-ship: {self.cfg.target} holds this backup's copy (its head record says so); sending it again", "info")
        return True

    def _ship_head(self) -> None:
        assert self.head is not None
        lengths = {rel: st.staged for rel, st in self.files.items() if st.sent and not st.unsent}
        head = self.head.make(self.staging.gens, lengths, self.generation_ids)
        if head is None:
            return
        self.head.stage(head)
        self.transport.send(self.staging.root, [HEAD], append=False)
        self.head.last_sent = head

    def _forget_old(self, inventory: Inventory) -> None:
        """Generations gone locally (retention) go remotely too, once the newest local one is
        complete there; their state is dropped."""
        local = {rel.split("/")[0] for rel, *_ in inventory}
        oldest = min((g for g in local if g.startswith(GENERATION_PREFIX)), default=None)
        # Only generations older than every local one: retention removes the oldest first.
        gone = sorted(g for g in {rel.split("/")[0] for rel in self.files if "/" in rel} - local if oldest is None or g < oldest)
        gone = [g for g in gone if is_generation_name(g)]  # checked when read; they reach --delete
        if not gone:
            return
        newest = max((g for g in local if g.startswith(GENERATION_PREFIX)), default=None)
        if newest is None or not all(st.sent for rel, st in self.files.items() if rel.startswith(newest + "/")):
            return
        sent = self.head.last_sent if self.head is not None else None
        if sent is None or any(g in sent.generations for g in gone):
            return  # the copy's head record still lists them: deleting them would make it look cut back
        self.transport.delete(gone)
        for rel in [r for r in self.files if r.split("/")[0] in gone]:
            del self.files[rel]
        for g in gone:
            self.staging.drop_generation(g)
            self.generation_ids.pop(g, None)
        self.log(f"pibackup-ship: removed {', '.join(gone)} from {self.cfg.target} (gone locally too)", "info")

    # --- state ----------------------------------------------------------------------------
    def _identity(self) -> Dict[str, Any]:
        return {"target": str(self.cfg.target), "key_id": self.cfg.key.key_id.hex() if self.cfg.key else None}

    def _load_state(self) -> None:
        path = os.path.join(self.staging.root, STATE_FILE)
        try:
            self.files, self.generation_ids, self.remote_checked = load_state(path, self._identity())
        except FileNotFoundError:
            return
        except (BadState, OSError) as e:
            # Start over: everything is sent again, once the remote directory is checked
            # again (its head record names this copy: it is ours).
            changed = isinstance(e, BadState) and str(e) == "another target or key"
            why = str(e) if changed else f"{path} is not valid ({e}): it is discarded"
            self.log(f"pibackup-ship: starting the remote copy afresh ({why})", "info" if changed else "warn")
            self.files, self.generation_ids, self.remote_checked = {}, {}, False
            self.staging.clear()
            return
        if self.cfg.key is not None:
            # Neither the staging copies nor this state are synced: after a power cut
            # they may be older than what the remote holds, and encrypting other bytes
            # under the same file id and chunk index would reuse a nonce. So every
            # unfinished encrypted file starts again under a new file id.
            for rel, st in self.files.items():
                if not st.done:
                    self.staging.drop(rel)
                    self.files[rel] = FileState()

    def _save_state(self) -> None:
        save_state(os.path.join(self.staging.root, STATE_FILE), self._identity(), self.files, self.generation_ids, self.remote_checked)
