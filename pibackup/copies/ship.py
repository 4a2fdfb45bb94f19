"""Shipping the backup directory to another host with the system's rsync over ssh.

A thread, never the hook, does it: every `interval` seconds it brings the remote copy in
step. The remote directory has the local layout (FORMAT.md), so a plain copy of it
restores with `pibackup restore`.

- Closed segments and snapshots never change: each is sent once.
- The open segment grows in place inside zeros written ahead (preallocation), which
  rsync --append cannot follow, so its valid part is copied to a staging file under
  DEST/.ship that only ever grows, and that file is sent with --append-verify.
- With a key (pibackup-ship-encrypt-key) every file is sent as an encrypted staging
  copy (crypt.py) that also only ever grows by whole chunks.
- Failures (network, remote host, its disk) are retried with backoff and reported;
  they never touch or hold back the local backup.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from pibackup.copies.copyhead import HEAD, HeadError, HeadMaker, read_head
from pibackup.copies.crypt import NO_NODE_ID, Binding, CryptError, Encryptor, Key
from pibackup.copies.shipstate import STATE_FILE, BadState, FileState, inside, is_generation_name, load_state, save_state
from pibackup.errors import PibackupError
from pibackup.store import directory as dst
from pibackup.store.journal import HEADER_SIZE, decode_header

Log = Callable[[str, str], None]
OpenSegment = Callable[[], Optional[Tuple[str, int]]]

STAGING = ".ship"
WRITE_CHUNK = 64 * 1024  # encrypt in small pieces: the hook thread never waits long for the GIL
BACKOFF_INTERVALS = 10  # retries back off to at most ten intervals (10 min by default)
STAGING_RESERVE = 64 * 1024 * 1024  # free space staging copies leave to the backup
RSYNC_IO_TIMEOUT = 120  # seconds without progress before rsync gives up

_USER = re.compile(r"^[A-Za-z_][A-Za-z0-9._-]{0,31}$")
_HOST = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])$")
_SPEC = re.compile(r"^(?:(?P<user>[^@:\[\]]*)@)?(?P<host>\[[^\]]*\]|[^:@]*):(?P<path>.*)$", re.S)
_RPATH = re.compile(r"^[A-Za-z0-9._/+,=@%~-]+$")
_LOCALPATH = re.compile(r"^/[A-Za-z0-9._/+,=@%~-]+$")  # passed inside rsync's -e string


class ShipError(PibackupError):
    pass


@dataclass(frozen=True)
class Target:
    user: Optional[str]
    host: str
    path: str

    @property
    def login(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    def __str__(self) -> str:
        return f"{self.login}:{self.path}"


def _group(rel: str, sent: bool) -> str:
    """Which call of a round sends a closed file: the ones partly sent already go together;
    a new one with its generation, its snapshot ("gen-000002/0") before its segments ("/1")."""
    if sent or "/" not in rel:
        return ""
    gen, name = rel.split("/", 1)
    return f"{gen}/{0 if name.startswith('snapshot-') else 1}"


def parse_target(spec: str, option: str = "pibackup-ship") -> Target:
    """[user@]host:/path, checked so that nothing in it can reach a shell or look like an option."""
    example = f"e.g. {option}=pi@backup.example.org:/srv/pibackup/mynode"
    if any(ord(c) < 32 or ord(c) == 127 for c in spec):
        raise ShipError(f"{option} contains control characters; write it as [user@]host:/path ({example})")
    m = _SPEC.match(spec)
    if not m or not m.group("host") or not m.group("path"):
        raise ShipError(f"{option}={spec!r} is not [user@]host:/path ({example})")
    user, host, path = m.group("user") or "", m.group("host"), m.group("path")
    if user and not _USER.match(user):
        raise ShipError(f"{option}: user name {user!r} has characters that are not allowed (letters, digits, . _ -)")
    if not _HOST.match(host):
        raise ShipError(
            f"{option}: host {host!r} is not a plain host name or address (letters, digits, . -; IPv6 in brackets)"
        )
    if not _RPATH.match(path):
        raise ShipError(
            f"{option}: remote path {path!r} has characters that are not allowed (spaces, quotes, $, ;, *, ... "
            "would pass through the remote shell); use letters, digits and . _ - / + , = @ % ~"
        )
    if path.startswith("-"):
        raise ShipError(f"{option}: remote path {path!r} starts with '-'; give the directory's real path")
    parts = path.split("/")
    if ".." in parts:
        raise ShipError(f"{option}: remote path {path!r} contains '..'; give the directory's real path")
    if path.rstrip("/") in ("", "~", ".") or path.strip("/") in ("", "~"):
        raise ShipError(f"{option}: give a directory of its own for the copy, not {path!r} ({example})")
    return Target(user or None, host, path.rstrip("/"))


def check_local_file(option: str, path: str) -> str:
    """A file ssh reads (identity, known_hosts): absolute, readable, and passable to rsync's -e."""
    if not _LOCALPATH.match(path):
        raise ShipError(
            f"{option}={path!r}: give an absolute path made of letters, digits and . _ - / + , = @ % ~ "
            "(rsync passes it to ssh in one string: no spaces or quotes)"
        )
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise ShipError(f"{option}: cannot read {path}: {e.strerror}") from e
    return path


@dataclass(frozen=True)
class ShipConfig:
    target: Target
    port: int
    identity: Optional[str]
    known_hosts: Optional[str]
    interval: float
    warn_after: float
    key: Optional[Key]


def ssh_command(cfg_port: int, identity: Optional[str], known_hosts: Optional[str]) -> List[str]:
    """Non-interactive and strict: no password prompts, no unknown host keys accepted."""
    cmd = ["ssh", "-p", str(cfg_port), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"]
    cmd += ["-o", "ConnectTimeout=20", "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
    if known_hosts:
        cmd += ["-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null"]
    if identity:
        cmd += ["-i", identity, "-o", "IdentitiesOnly=yes"]
    return cmd


def rsync_base(port: int, identity: Optional[str], known_hosts: Optional[str]) -> List[str]:
    # rsync splits -e on blanks itself (no shell); the values were checked to hold none.
    return ["rsync", "-e", " ".join(ssh_command(port, identity, known_hosts)), f"--timeout={RSYNC_IO_TIMEOUT}"]


def explain_rsync_failure(code: int, stderr: str, target: Target, port: int, known_hosts: Optional[str]) -> str:
    """One line that says what went wrong and what to do."""
    text = stderr.strip()
    low = text.lower()
    where = f"{target.host} port {port}"
    kh = known_hosts or "~/.ssh/known_hosts"
    if "host key verification failed" in low or "no matching host key" in low:
        return (
            f"ssh does not know {where}'s host key (or it changed): check the host's fingerprint, then add it "
            f"to {kh}, e.g. ssh-keyscan -p {port} {target.host} >> {kh}"
        )
    if "remote host identification has changed" in low:
        return f"the host key of {where} CHANGED: if you did not reinstall that host, someone may be in between; otherwise fix {kh}"
    if "permission denied" in low and ("publickey" in low or "password" in low):
        return (
            f"{target.login} refused our ssh key at {where}: add the public key of pibackup-ship-identity "
            f"to {target.login}'s ~/.ssh/authorized_keys there"
        )
    if "connection refused" in low:
        return f"{where} refuses connections: is sshd running there, and the port right?"
    if "could not resolve" in low or "name or service not known" in low or "temporary failure in name resolution" in low:
        return f"cannot resolve {target.host}: check the name, or the Pi's DNS"
    if "timed out" in low or "no route to host" in low or "network is unreachable" in low or code == 30:
        return f"{where} does not answer (network down or host off); will retry"
    if "no space left" in low or "disk quota" in low:
        return f"the remote host is out of space in {target.path}: free space there (the local backup is unaffected)"
    if "rsync: command not found" in low or "rsync: not found" in low or code == 127:
        return f"rsync is not installed on {target.host}: install it there (apt install rsync)"
    if "read-only file system" in low:
        return f"{target.path} on {target.host} is read-only"
    if "permission denied" in low:
        return f"no permission to write {target.path} on {target.host}: fix its owner or permissions"
    if "no such file or directory" in low and "mkdir" in low:
        return f"the parent directory of {target.path} does not exist on {target.host}: create it"
    if code == 11 and not text:  # rsync sometimes loses the receiver's message as it dies
        return f"file I/O error on {target.host} in {target.path} (rsync code 11): is its disk full or failing?"
    last = text.splitlines()[-1] if text else f"rsync exited with code {code}"
    return f"shipping to {target} failed: {last}"


@dataclass
class ShipStatus:
    state: str = "starting"  # starting, ok, failing
    target: str = ""
    encrypted: bool = False
    interval_seconds: float = 0.0
    last_success: Optional[float] = None  # wall clock of the last round that brought the remote in step
    last_attempt: Optional[float] = None
    last_error: Optional[str] = None
    failures_in_a_row: int = 0
    rounds: int = 0
    files_sent: int = 0
    bytes_staged: int = 0


class Shipper:
    def __init__(self, cfg: ShipConfig, destination: str, open_segment: OpenSegment, log: Log):
        self.cfg = cfg
        self.destination = destination
        self.staging = os.path.join(destination, STAGING)
        self.open_segment = open_segment
        self.log = log
        self.files: Dict[str, FileState] = {}
        self.generation_ids: Dict[str, str] = {}  # gen-NNNNNN -> generation id shipped under that name
        self.remote_generations: List[str] = []
        self.remote_checked = False
        self.status_ = ShipStatus(target=str(cfg.target), encrypted=cfg.key is not None, interval_seconds=cfg.interval)
        self.started = time.time()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._proc: Optional[subprocess.Popen] = None
        self._proc_lock = threading.Lock()
        self._logged_error: Optional[str] = None
        self._last_stdout = ""
        self.head: Optional[HeadMaker] = None  # made at start(): it needs the staging directory
        self._gens: List[dst.Generation] = []

    # --- lifecycle ------------------------------------------------------------------
    def start(self) -> None:
        os.makedirs(self.staging, mode=0o700, exist_ok=True)
        self.head = HeadMaker(self.destination, self.staging, self.cfg.key)
        self._load_state()
        self._thread = threading.Thread(target=self._loop, name="pibackup-ship", daemon=True)
        self._thread.start()

    def ship_now(self) -> None:
        self._wake.set()

    def stop(self, wait: float = 2.0) -> None:
        """Stop after the current round, or cut it short after `wait` seconds: the next
        start goes on from the saved state (an interrupted append is verified then)."""
        self._stop.set()
        self._wake.set()
        if self._thread is None:
            return
        self._thread.join(wait)
        with self._proc_lock:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.terminate()
        self._thread.join(10)

    def _loop(self) -> None:
        delay = 0.0
        while not self._stop.is_set():
            self._wake.wait(delay)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.round()
                delay = self.cfg.interval
            except Exception as e:  # the shipper must never take the plugin down
                if self._stop.is_set():
                    break
                if isinstance(e, PibackupError):
                    message = str(e)
                elif isinstance(e, OSError):
                    message = f"shipping failed locally: {e.filename or ''}: {e.strerror}"
                else:
                    message = f"shipping failed: {type(e).__name__}: {e}"
                delay = self._failed(message)

    def _failed(self, message: str) -> float:
        s = self.status_
        s.state = "failing"
        s.failures_in_a_row += 1
        s.last_error = message
        if message != self._logged_error:
            self._logged_error = message
            self.log(f"pibackup-ship: {message}. The local backup goes on; retrying.", "warn")
        return float(self.cfg.interval * min(BACKOFF_INTERVALS, 2 ** min(s.failures_in_a_row, 12)))

    # --- one round ------------------------------------------------------------------------
    def round(self) -> None:
        """Bring the remote copy in step with the local directory as it is now."""
        s = self.status_
        began = time.time()
        s.last_attempt = began
        if self._stop.is_set():
            return
        if not self.remote_checked:
            self._check_remote()
        elif s.failures_in_a_row and self.cfg.key is not None:
            # While the host is away, encrypted copies are not staged on the stick again and
            # again: one login first says whether it is back. (Skipping the staging of closed
            # files instead let a round send a journal without the snapshot before it.)
            self._probe()
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
            if closed and (self.cfg.key is None or rel == dst.MARKER):  # the marker is never encrypted
                # A closed plain file is sent from the backup directory itself; the remote
                # holds a prefix of it if it was staged while open.
                st.staged, st.final, st.unsent = length, True, True
                # Never sent: whole, through a temporary file the remote renames into place.
                # Partly sent while it was open: the rest appended.
                batches.setdefault((True, self.destination, st.sent, _group(rel, st.sent)), []).append(rel)
                continue
            self._stage(rel, path, length, closed, st)
            if st.unsent:  # new now, or left over from a round that failed
                batches.setdefault((closed, self.staging, st.sent, _group(rel, st.sent) if closed else ""), []).append(rel)
        # Oldest first: closed before open; among closed files the ones already partly sent
        # (an older segment's last bytes) before new ones, and new ones by generation.
        for key in sorted(batches, key=lambda k: (not k[0], not k[2], k[3], k[1] != self.destination)):
            rels = batches[key]
            self._rsync(key[1], rels, append=key[2])
            for rel in rels:
                st = self.files[rel]
                st.sent, st.unsent = True, False
                s.files_sent += 1
                if st.final:
                    st.done = True
                    self._drop_staging(rel)
        # The head record goes after the data it describes, and before any remote deletion:
        # a round cut short anywhere leaves a copy holding at least what its record says.
        self._ship_head()
        self._forget_old(inventory)
        self._save_state()
        if s.state == "failing":
            self.log(f"pibackup-ship: {self.cfg.target} reachable again; the remote copy is in step", "info")
        self._logged_error = None
        s.state, s.last_success, s.failures_in_a_row, s.last_error = "ok", began, 0, None
        s.rounds += 1

    def _inventory(self) -> List[Tuple[str, str, int, bool]]:
        """(relative path, path, length to ship, closed) for the marker and every file of
        every complete generation. Only the writer's open segment is not closed."""
        d = dst.Destination(self.destination)
        out: List[Tuple[str, str, int, bool]] = []
        marker = os.path.join(self.destination, dst.MARKER)
        out.append((dst.MARKER, marker, os.path.getsize(marker), True))
        gens = self._gens = d.generations()
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

    # --- staging copies ---------------------------------------------------------------
    def _staging_path(self, rel: str) -> str:
        return os.path.join(self.staging, rel)

    def _stage(self, rel: str, path: str, length: int, closed: bool, st: FileState) -> bool:
        """Append what is new in the local file to its staging copy; True if it grew."""
        spath = self._staging_path(rel)
        try:
            have = os.path.getsize(spath)
        except FileNotFoundError:
            have = -1
        if have != st.staged_size and not (have < 0 and st.staged_size == 0):
            # The copy is not what the state says (a crash since): start it again.
            self._restart_file(rel, st)
        if st.staged >= length and (st.final or not closed):
            return False
        os.makedirs(os.path.dirname(spath), mode=0o700, exist_ok=True)
        self._check_room(length - st.staged)
        key = self.cfg.key
        enc = None
        if key is not None:
            file_id = bytes.fromhex(st.file_id) if st.file_id else None
            enc = Encryptor(key, rel, file_id, st.next_index, binding=self._binding(rel, st))
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
        self.status_.bytes_staged += length - st.staged
        st.staged = length
        st.final = closed
        st.unsent = True
        if enc is not None:
            st.next_index = enc.index
        return True

    def _binding(self, rel: str, st: FileState) -> Binding:
        """A new file is bound to this copy and its generation's node; one being appended
        to keeps what its header says."""
        assert self.head is not None
        if st.staged_size == 0:
            gen = next((g for g in self._gens if g.name == rel.split("/")[0]), None)
            b = self.head.binding(gen)
            st.node_id = "" if b.node_id == NO_NODE_ID else b.node_id.hex()
            return b
        return Binding(self.head.copy_id, bytes.fromhex(st.node_id) if st.node_id else NO_NODE_ID)

    def _check_room(self, need: int) -> None:
        """Staging must never take the space the backup itself needs: keep STAGING_RESERVE
        free beyond the copy, or skip this round's staging and say so."""
        st = os.statvfs(self.staging)
        free = st.f_bavail * st.f_frsize
        snaps = [os.path.getsize(p) for g in dst.Destination(self.destination).generations()[-1:] for p in g.snapshots]
        reserve = STAGING_RESERVE + max(snaps, default=0)  # room for the next snapshot of the node's database
        if free < need + reserve:
            raise ShipError(
                f"not enough free space on the backup medium to stage {need // 1024} KiB for shipping "
                f"({free // (1024 * 1024)} MiB free, {reserve // (1024 * 1024)} MiB kept for the backup itself); "
                "free space on it or use a bigger one"
            )

    def _restart_file(self, rel: str, st: FileState) -> None:
        self._drop_staging(rel)
        if self.cfg.key is None:
            # A plain copy is the local file's prefix, byte for byte: the remote one still is.
            sent = st.sent
            st.__init__()  # type: ignore[misc]
            st.sent = sent
        else:
            st.__init__()  # type: ignore[misc]  # a new file id: the remote copy is replaced whole

    def _drop_staging(self, rel: str) -> None:
        path = self._staging_path(rel)
        if not inside(self.staging, path):
            return  # never reached: state.json's names are checked when it is read
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    # --- the remote side ---------------------------------------------------------------
    def _run(self, cmd: Sequence[str], stdin: Optional[bytes] = None) -> Tuple[int, str]:
        with self._proc_lock:
            if self._stop.is_set():
                raise ShipError("stopping")
            self._proc = subprocess.Popen(
                list(cmd),
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # a Ctrl-C for lightningd is not one for rsync
            )
        try:
            out, err = self._proc.communicate(stdin)
        finally:
            with self._proc_lock:
                code = self._proc.returncode
                self._proc = None
        self._last_stdout = out.decode(errors="replace")
        return code, err.decode(errors="replace")

    def _base(self) -> List[str]:
        return rsync_base(self.cfg.port, self.cfg.identity, self.cfg.known_hosts)

    def _rsync(self, root: str, rels: Sequence[str], append: bool) -> None:
        cmd = self._base() + ["--recursive", "--chmod=D0700,F0600", "--perms", "--files-from=-", "--from0"]
        # --append-verify: send only what the remote copy lacks, then check the whole file.
        # Otherwise the remote has nothing of this copy: always send it (--ignore-times).
        cmd.append("--append-verify" if append else "--ignore-times")
        cmd += [root + "/", f"{self.cfg.target}/"]
        code, err = self._run(cmd, stdin=b"\0".join(r.encode() for r in rels))
        if code != 0:
            raise ShipError(explain_rsync_failure(code, err, self.cfg.target, self.cfg.port, self.cfg.known_hosts))

    def _check_remote(self) -> None:
        """Once: the remote directory must be ours, new, or empty; never someone else's.
        Ours: only what this shipper sent, or a copy whose head record names our copy id
        (our shipping state was lost or discarded: everything is sent again)."""
        if not self._probe():
            self.remote_checked = True  # rsync creates it with the first files
            return
        names = {line.split()[-1] for line in self._last_stdout.splitlines() if line.strip()} - {"."}
        known = {dst.MARKER, HEAD} | {n.split("/")[0] for n in self.files}
        foreign = sorted(n for n in names if n not in known)
        if foreign and HEAD in names and all(is_generation_name(n) for n in foreign) and self._remote_is_ours():
            foreign = []
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise ShipError(
                f"the remote directory {self.cfg.target} holds files this pibackup did not ship ({shown}); "
                "point pibackup-ship at an empty or new directory. If it is an earlier copy of this node (its shipping "
                "state in DEST/.ship was lost), rename it there and let a new copy complete before you delete it"
            )
        self.remote_checked = True

    def _remote_is_ours(self) -> bool:
        """Does the remote head record name this backup directory's copy id? Then its
        generation ids are taken as known: a new stick is still not shipped over it."""
        assert self.head is not None
        with tempfile.TemporaryDirectory(dir=self.staging) as tmp:
            code, _ = self._run(self._base() + ["--max-size=1m", f"{self.cfg.target}/{HEAD}", tmp + "/"])
            try:
                theirs = read_head(os.path.join(tmp, HEAD), self.cfg.key) if code == 0 else None
            except (OSError, HeadError, CryptError):
                theirs = None
        if theirs is None or theirs.copy_id != self.head.copy_id:
            return False
        for name, g in theirs.generations.items():
            self.generation_ids.setdefault(name, g["id"])
        self.log(f"pibackup-ship: {self.cfg.target} holds this backup's copy (its head record says so); sending it again", "info")
        return True

    def _ship_head(self) -> None:
        assert self.head is not None
        lengths = {rel: st.staged for rel, st in self.files.items() if st.sent and not st.unsent}
        head = self.head.make(self._gens, lengths, self.generation_ids)
        if head is None:
            return
        self.head.stage(head)
        self._rsync(self.staging, [HEAD], append=False)
        self.head.last_sent = head

    def _probe(self) -> bool:
        """One login listing the remote directory (its names in _last_stdout): ShipError if
        the host cannot be reached; False if the directory does not exist yet."""
        code, err = self._run(self._base() + ["--list-only", f"{self.cfg.target}/"])
        if code == 23 and "no such file or directory" in err.lower():
            return False
        if code != 0:
            raise ShipError(explain_rsync_failure(code, err, self.cfg.target, self.cfg.port, self.cfg.known_hosts))
        return True

    def _forget_old(self, inventory: List[Tuple[str, str, int, bool]]) -> None:
        """Generations gone locally (retention) go remotely too, once the newest local one is
        complete there; their state is dropped."""
        local = {rel.split("/")[0] for rel, *_ in inventory}
        oldest = min((g for g in local if g.startswith("gen-")), default=None)
        # Only generations older than every local one: retention removes the oldest first.
        gone = sorted(g for g in {rel.split("/")[0] for rel in self.files if "/" in rel} - local if oldest is None or g < oldest)
        gone = [g for g in gone if is_generation_name(g)]  # checked when read; they reach --delete
        if not gone:
            return
        newest = max((g for g in local if g.startswith("gen-")), default=None)
        if newest is None or not all(st.sent for rel, st in self.files.items() if rel.startswith(newest + "/")):
            return
        sent = self.head.last_sent if self.head is not None else None
        if sent is None or any(g in sent.generations for g in gone):
            return  # the copy's head record still lists them: deleting them would make it look cut back
        with tempfile.TemporaryDirectory(dir=self.staging) as empty:
            cmd = self._base() + ["--recursive", "--delete"]
            cmd += [f"--filter=+ /{g}/***" for g in gone] + ["--filter=- *", empty + "/", f"{self.cfg.target}/"]
            code, err = self._run(cmd)
        if code != 0:
            raise ShipError(explain_rsync_failure(code, err, self.cfg.target, self.cfg.port, self.cfg.known_hosts))
        for rel in [r for r in self.files if r.split("/")[0] in gone]:
            del self.files[rel]
        for g in gone:
            if inside(self.staging, os.path.join(self.staging, g)):
                shutil.rmtree(os.path.join(self.staging, g), ignore_errors=True)
            self.generation_ids.pop(g, None)
        self.log(f"pibackup-ship: removed {', '.join(gone)} from {self.cfg.target} (gone locally too)", "info")

    # --- state ----------------------------------------------------------------------------
    def _identity(self) -> Dict[str, Any]:
        return {"target": str(self.cfg.target), "key_id": self.cfg.key.key_id.hex() if self.cfg.key else None}

    def _load_state(self) -> None:
        path = os.path.join(self.staging, STATE_FILE)
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
            for name in os.listdir(self.staging):
                p = os.path.join(self.staging, name)
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p, ignore_errors=True)
            return
        if self.cfg.key is not None:
            # Neither the staging copies nor this state are synced: after a power cut
            # they may be older than what the remote holds, and encrypting other bytes
            # under the same file id and chunk index would reuse a nonce. So every
            # unfinished encrypted file starts again under a new file id.
            for rel, st in self.files.items():
                if not st.done:
                    self._drop_staging(rel)
                    self.files[rel] = FileState()

    def _save_state(self) -> None:
        save_state(os.path.join(self.staging, STATE_FILE), self._identity(), self.files, self.generation_ids, self.remote_checked)

    # --- what status shows ------------------------------------------------------------------
    def lag(self) -> Optional[float]:
        """Seconds since the remote copy was last in step with the local one."""
        last = self.status_.last_success
        return time.time() - (last if last is not None else self.started)

    def warnings(self) -> List[str]:
        """A lag past pibackup-ship-warn-after. The text stays the same while the cause does,
        so the log gets it once (status.py), not at every check."""
        lag = self.lag()
        if lag is None or lag < self.cfg.warn_after:
            return []
        since = self.status_.last_success
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since if since is not None else self.started))
        what = "last in step at" if since is not None else "never in step since the start at"
        reason = self.status_.last_error or "no successful round yet"
        return [f"shipping to {self.cfg.target} is behind: the remote copy was {what} {when} ({reason})"]

    def status(self) -> Dict[str, Any]:
        out: Dict[str, Any] = asdict(self.status_)
        lag = self.lag()
        out["lag_seconds"] = None if lag is None else int(lag)
        out["warn_after_seconds"] = self.cfg.warn_after
        return out

