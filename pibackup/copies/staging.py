"""Staging copies under DEST/.ship: the valid part of a file, encrypted with a key, copied
to a file that only ever grows, so that rsync --append-verify can send it piece by piece.
"""

from __future__ import annotations

import os
import shutil
from typing import List, Optional

from pibackup.copies.crypt import NO_NODE_ID, Binding, Encryptor, Key
from pibackup.copies.head import HeadMaker
from pibackup.copies.state import FileState, inside
from pibackup.copies.target import ShipError
from pibackup.store import directory as dst
from pibackup.store.layout import STAGING_DIR

WRITE_CHUNK = 64 * 1024  # encrypt in small pieces: the hook thread never waits long for the GIL
STAGING_RESERVE = 64 * 1024 * 1024  # free space staging copies leave to the backup


class Staging:
    """The staging directory of one backup directory. `head` (its copy id) and `gens` (the
    round's listing) decide the binding of a new encrypted file."""

    def __init__(self, destination: str, key: Optional[Key]):
        self.destination = destination
        self.root = os.path.join(destination, STAGING_DIR)
        self.key = key
        self.head: Optional[HeadMaker] = None  # made at open(): it needs the directory
        self.gens: List[dst.Generation] = []
        self.bytes_staged = 0

    def open(self) -> HeadMaker:
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        self.head = HeadMaker(self.destination, self.root, self.key)
        return self.head

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def stage(self, rel: str, path: str, length: int, closed: bool, st: FileState) -> bool:
        """Append what is new in the local file to its staging copy; True if it grew."""
        spath = self.path(rel)
        try:
            have = os.path.getsize(spath)
        except FileNotFoundError:
            have = -1
        if have != st.staged_size and not (have < 0 and st.staged_size == 0):
            # The copy is not what the state says (a crash since): start it again.
            self.restart_file(rel, st)
        if st.staged >= length and (st.final or not closed):
            return False
        os.makedirs(os.path.dirname(spath), mode=0o700, exist_ok=True)
        self.check_room(length - st.staged)
        key = self.key
        enc = None
        if key is not None:
            file_id = bytes.fromhex(st.file_id) if st.file_id else None
            enc = Encryptor(key, rel, file_id, st.next_index, binding=self.binding(rel, st))
        with open(path, "rb") as src, open(spath, "ab") as out:
            if st.staged_size == 0 and enc is not None:
                out.write(enc.header)
                st.file_id = enc.file_id.hex()
            src.seek(st.staged)
            pos = st.staged
            ended = False
            while pos < length:
                piece = src.read(min(WRITE_CHUNK, length - pos))
                if not piece:
                    if not closed:
                        raise ShipError(f"{path} is shorter than expected ({pos} < {length} bytes)")
                    # A closed segment gave back its preallocated zeros after it was listed
                    # (journal.trim_zeros): the file ends here.
                    length, ended = pos, True
                    break
                last = pos + len(piece) >= length
                out.write(piece if enc is None else enc.chunk(piece, final=closed and last))
                pos += len(piece)
            if enc is not None and closed and (st.staged >= length or ended):
                out.write(enc.chunk(b"", final=True))  # closed with nothing new (or nothing more)
            out.flush()
            # No fsync: the copy is rebuilt if a crash loses it, and the stick is spared a sync.
            st.staged_size = out.tell()
        self.bytes_staged += length - st.staged
        st.staged = length
        st.final = closed
        st.unsent = True
        if enc is not None:
            st.next_index = enc.index
        return True

    def binding(self, rel: str, st: FileState) -> Binding:
        """A new file is bound to this copy and its generation's node; one being appended
        to keeps what its header says."""
        assert self.head is not None
        if st.staged_size == 0:
            gen = next((g for g in self.gens if g.name == rel.split("/")[0]), None)
            b = self.head.binding(gen)
            st.node_id = "" if b.node_id == NO_NODE_ID else b.node_id.hex()
            return b
        return Binding(self.head.copy_id, bytes.fromhex(st.node_id) if st.node_id else NO_NODE_ID)

    def check_room(self, need: int) -> None:
        """Staging must never take the space the backup itself needs: keep STAGING_RESERVE
        free beyond the copy, or skip this round's staging and say so."""
        st = os.statvfs(self.root)
        free = st.f_bavail * st.f_frsize
        snaps = [os.path.getsize(p) for g in dst.Destination(self.destination).generations()[-1:] for p in g.snapshots]
        reserve = STAGING_RESERVE + max(snaps, default=0)  # room for the next snapshot of the node's database
        if free < need + reserve:
            raise ShipError(
                f"not enough free space on the backup medium to stage {need // 1024} KiB for shipping "
                f"({free // (1024 * 1024)} MiB free, {reserve // (1024 * 1024)} MiB kept for the backup itself); "
                "free space on it or use a bigger one"
            )

    def restart_file(self, rel: str, st: FileState) -> None:
        self.drop(rel)
        if self.key is None:
            # A plain copy is the local file's prefix, byte for byte: the remote one still is.
            sent = st.sent
            st.__init__()  # type: ignore[misc]
            st.sent = sent
        else:
            st.__init__()  # type: ignore[misc]  # a new file id: the remote copy is replaced whole

    def drop(self, rel: str) -> None:
        path = self.path(rel)
        if not inside(self.root, path):
            return  # never reached: state.json's names are checked when it is read
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def drop_generation(self, name: str) -> None:
        """A generation gone from the copy: its staging copies go too."""
        path = os.path.join(self.root, name)
        if inside(self.root, path):
            shutil.rmtree(path, ignore_errors=True)

    def clear(self) -> None:
        """Every staging copy (the state that described them was discarded)."""
        for name in os.listdir(self.root):
            p = os.path.join(self.root, name)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
