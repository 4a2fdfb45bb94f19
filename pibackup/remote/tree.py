"""The receiver's side of the copy: the files of a backup directory kept under DIR exactly as
a shipped copy holds them (plain, or encrypted files the receiver cannot read), changed only
by the operations of docs/REMOTE-PROTOCOL.md and only in the ways the receiver allows.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from pibackup.copies.crypt import CHUNK, CHUNK_PLAIN_MAX, FLAG_FINAL, HEADER_SIZE, HEADER_V2_SIZE, MAGIC, TAG_SIZE, VERSION
from pibackup.errors import PibackupError
from pibackup.store.chain import Walk, walk_segment
from pibackup.store.fsio import fsync_dir, write_text_durably
from pibackup.store.layout import (
    DELETED_SUFFIX,
    HEAD,
    MARKER,
    TMP_SUFFIX,
    TOP_FILES,
    generation_number,
    is_generation_name,
    is_layout_path,
    is_segment_name,
)

IDENTITY = ".pibackup-serve"  # the copy and node this directory holds, written at the first HELLO
LOCK = ".pibackup-serve.lock"  # flock'ed by the receiver for as long as it runs


class Refused(PibackupError):
    """An operation the receiver does not allow, or one that failed here; said to the sender."""


@dataclass
class FileInfo:
    size: int  # bytes in the file (after a torn tail was cut)
    plain: int  # bytes of the backup's own file it holds (the same as size when not encrypted)
    chunks: int = 0  # encrypted: whole chunks
    final: bool = False  # encrypted: ends with its final chunk; plain: a finished whole file
    header: str = ""  # encrypted: its header, hex (the sender goes on with the same file id)
    chain: int = 0  # a plain segment: the checksum chain's value at its end (the sender compares its own)
    last: str = ""  # encrypted: SHA-256 of its last chunk, which the sender can encrypt again to compare
    last_plain: int = 0  # encrypted: bytes of plaintext in that chunk

    def to_json(self) -> Dict[str, Any]:
        return {
            "size": self.size,
            "plain": self.plain,
            "chunks": self.chunks,
            "final": self.final,
            "header": self.header,
            "chain": self.chain,
            "last": self.last,
            "last_plain": self.last_plain,
        }


def crypt_walk(path: str) -> Optional[FileInfo]:
    """An encrypted file's whole chunks, read from their headers alone (no key here)."""
    with open(path, "rb") as f:
        head = f.read(HEADER_V2_SIZE)
        if not head.startswith(MAGIC) or len(head) < HEADER_SIZE:
            return None
        hsize = HEADER_V2_SIZE if head[len(MAGIC)] == VERSION else HEADER_SIZE
        if len(head) < hsize:
            return FileInfo(0, 0)
        info = FileInfo(hsize, 0, header=head[:hsize].hex())
        f.seek(hsize)
        while not info.final:
            ch = f.read(CHUNK.size)
            if len(ch) < CHUNK.size:
                break
            flags, length = CHUNK.unpack(ch)
            body = f.read(length + TAG_SIZE) if length <= CHUNK_PLAIN_MAX else b""
            if length > CHUNK_PLAIN_MAX or flags & ~FLAG_FINAL or len(body) < length + TAG_SIZE:
                break
            info.last = hashlib.sha256(ch + body).hexdigest()
            info.last_plain = length
            info.size += CHUNK.size + length + TAG_SIZE
            info.plain += length
            info.chunks += 1
            info.final = bool(flags & FLAG_FINAL)
    return info


class Tree:
    """DIR as the receiver keeps it. Every change goes through one of the methods below."""

    def __init__(self, root: str, append_only: bool, keep: int):
        self.root = os.path.abspath(root)
        self.append_only = append_only
        self.keep = keep
        self.encrypted = False
        self._open: Dict[str, int] = {}  # rel -> fd of a file being appended to
        self._lock_fd: Optional[int] = None

    # --- paths ------------------------------------------------------------------------
    def path(self, rel: Any, tmp: bool = False) -> str:
        if not isinstance(rel, str) or not is_layout_path(rel):
            raise Refused(f"{rel!r} is not a file of a backup directory; refused")
        return os.path.join(self.root, rel) + (TMP_SUFFIX if tmp else "")

    # --- HELLO ------------------------------------------------------------------------
    def hello(self, meta: Dict[str, Any]) -> Dict[str, Any]:
        """Check that DIR is this copy's (or empty), tidy what a crash left, list what it holds."""
        if not os.path.isdir(self.root):
            raise Refused(f"{self.root} does not exist on the remote host: create it there (mkdir -p {self.root})")
        self._lock()
        copy, node = str(meta.get("copy_id", "")), str(meta.get("node_id", ""))
        self.encrypted = bool(meta.get("encrypted"))
        ident = self._identity()
        if ident is None:
            held = sorted(n for n in os.listdir(self.root) if n != IDENTITY and not n.startswith("."))
            if held:
                raise Refused(
                    f"{self.root} holds files this receiver did not write ({', '.join(held[:3])}); give pibackup serve "
                    "an empty directory of its own"
                )
            ident = {"copy_id": copy, "node_id": node, "encrypted": self.encrypted}
            self._save_identity(ident)
        elif ident.get("copy_id") != copy:
            whose = f"node {ident.get('node_id')}" if ident.get("node_id") else "an unknown node"
            raise Refused(
                f"{self.root} holds another backup (copy {ident.get('copy_id')} of {whose}), not this one (copy {copy}); "
                "give each backup its own directory on the remote host"
            )
        elif node and ident.get("node_id") and ident["node_id"] != node:
            raise Refused(f"{self.root} holds the backup of node {ident['node_id']}, not of node {node}; refused")
        elif bool(ident.get("encrypted")) != self.encrypted:
            kind = "encrypted" if ident.get("encrypted") else "plain"
            raise Refused(f"{self.root} holds a {kind} copy: the sender's encryption setting changed; give a new directory")
        elif node and not ident.get("node_id"):
            ident["node_id"] = node  # a new node learns its id after its first calls
            self._save_identity(ident)
        return {"files": {rel: info.to_json() for rel, info in self._listing().items()}, "append_only": self.append_only}

    def _lock(self) -> None:
        """One receiver at a time per directory: a session that hangs (a stopped process, a
        half-open connection) keeps it until it ends, and its messages still in the pipe are
        applied or refused before a new session lists the files."""
        fd = os.open(os.path.join(self.root, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            raise Refused(
                f"another pibackup serve is writing {self.root} (an earlier session that has not ended yet); retrying later"
            ) from e
        self._lock_fd = fd

    def _identity(self) -> Optional[Dict[str, Any]]:
        try:
            with open(os.path.join(self.root, IDENTITY), encoding="utf-8") as f:
                obj = json.loads(f.read(4096))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise Refused(f"{os.path.join(self.root, IDENTITY)} cannot be read ({e}); the directory is damaged") from e
        if not isinstance(obj, dict):
            raise Refused(f"{os.path.join(self.root, IDENTITY)} is damaged")
        return obj

    def _save_identity(self, ident: Dict[str, Any]) -> None:
        write_text_durably(os.path.join(self.root, IDENTITY), json.dumps(ident, sort_keys=True) + "\n")

    def _listing(self) -> Dict[str, FileInfo]:
        """Every file of the copy; a file being put (.tmp) is dropped: never acknowledged."""
        out: Dict[str, FileInfo] = {}
        rels: List[str] = [n for n in (MARKER, *TOP_FILES) if os.path.exists(os.path.join(self.root, n))]
        for n in os.listdir(self.root):
            if n.endswith(DELETED_SUFFIX) and is_generation_name(n[: -len(DELETED_SUFFIX)]):
                shutil.rmtree(os.path.join(self.root, n), ignore_errors=True)  # retention cut short
        for g in sorted(n for n in os.listdir(self.root) if is_generation_name(n)):
            for name in sorted(os.listdir(os.path.join(self.root, g))):
                rel = f"{g}/{name}"
                if name.endswith(TMP_SUFFIX) and is_layout_path(rel[: -len(TMP_SUFFIX)]):
                    os.unlink(os.path.join(self.root, rel))
                elif is_layout_path(rel):
                    rels.append(rel)
        for rel in rels:
            out[rel] = self._info(rel)
        return out

    def _info(self, rel: str) -> FileInfo:
        path = os.path.join(self.root, rel)
        size = os.path.getsize(path)
        enc = crypt_walk(path) if rel != MARKER else None
        if enc is not None:
            self._cut(rel, enc.size, size)
            return enc
        if is_segment_name(rel.rsplit("/", 1)[-1]):
            w = walk_segment(Walk(path), size) if size else Walk(path, 0)
            self._cut(rel, w.offset, size)
            return FileInfo(w.offset, w.offset, chain=w.checksum)
        return FileInfo(size, size, final=True)

    def _cut(self, rel: str, valid: int, size: int) -> None:
        """A torn last append (this host lost power before syncing it) is cut off: it was never
        acknowledged as durable, so even --append-only allows this."""
        if valid < size:
            os.truncate(os.path.join(self.root, rel), valid)

    # --- operations -----------------------------------------------------------------------
    def append(self, rel: Any, offset: Any, data: bytes, sync: bool, restart: bool = False) -> int:
        """Append at exactly `offset` (the file's size: never over anything held). With
        `restart` (offset 0), a segment the sender found to differ from its own is set aside
        under a name no reader takes, kept, and the segment starts again."""
        path = self.path(rel)
        if rel == MARKER or not is_segment_name(rel.rsplit("/", 1)[-1]):
            raise Refused(f"{rel}: only journal segments are appended to")
        if restart and offset == 0 and os.path.exists(path):
            self._sync_open()
            os.rename(path, f"{path}.diverged-{time.time_ns()}")
            fsync_dir(os.path.dirname(path))
        fd = self._open.get(rel)
        created = False
        if fd is None:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            created = not os.path.exists(path)
            self._sync_open()  # an older segment is durable before a newer one exists
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            self._open[rel] = fd
        size = os.fstat(fd).st_size
        if offset != size:
            raise Refused(f"{rel}: append at offset {offset}, but the copy holds {size} bytes; refused")
        try:
            _pwrite_all(fd, data, size)
            if sync:
                os.fdatasync(fd)
        except OSError:
            os.ftruncate(fd, size)  # never acknowledged: the file stays as it was
            raise
        if created:
            fsync_dir(os.path.dirname(path))
            if rel.endswith("seg-000001.pbj"):
                fsync_dir(self.root)
        return size + len(data)

    def _sync_open(self) -> None:
        for fd in self._open.values():
            os.fdatasync(fd)
            os.close(fd)
        self._open.clear()

    def put(self, rel: Any, offset: Any, data: bytes) -> None:
        """A piece of a whole file (a snapshot, the marker), into its .tmp until FINISH."""
        path = self.path(rel)
        if os.path.exists(path) and self.append_only and rel not in TOP_FILES and rel != MARKER:
            raise Refused(f"{rel} exists and this receiver is --append-only: it is never rewritten")
        tmp = self.path(rel, tmp=True)
        os.makedirs(os.path.dirname(tmp), mode=0o700, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_TRUNC if offset == 0 else 0)
        fd = os.open(tmp, flags, 0o600)
        try:
            if os.fstat(fd).st_size != offset:
                raise Refused(f"{rel}: piece at offset {offset}, but {os.fstat(fd).st_size} bytes arrived; refused")
            _pwrite_all(fd, data, offset)
        finally:
            os.close(fd)

    def finish(self, rel: Any, size: Any) -> None:
        """The whole file arrived: synced, renamed into place, its directory synced."""
        path, tmp = self.path(rel), self.path(rel, tmp=True)
        if not os.path.exists(tmp) or os.path.getsize(tmp) != size:
            raise Refused(f"{rel}: {size} bytes were announced but not received; send it again")
        if os.path.exists(path) and _same(path, tmp):
            os.unlink(tmp)  # sent again at a new session, unchanged
            return
        if os.path.exists(path) and self.append_only:
            if rel not in TOP_FILES:
                raise Refused(f"{rel} exists and this receiver is --append-only: it is never rewritten")
            # NODE and emergency.recover are rewritten whole by lightningd: the one they
            # replace is kept beside them (a name no reader takes), never lost.
            os.link(path, f"{path}.replaced-{time.time_ns()}")
        self._sync_open()
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        fsync_dir(os.path.dirname(path))
        if os.path.dirname(path) != self.root:
            fsync_dir(self.root)

    def head(self, data: bytes, newest: Any) -> None:
        """The sender's head record, durably; then this receiver's own retention."""
        self._sync_open()  # the record never says more than the files hold
        tmp = os.path.join(self.root, HEAD + TMP_SUFFIX)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, os.path.join(self.root, HEAD))
        fsync_dir(self.root)
        if isinstance(newest, str) and is_generation_name(newest):
            self._retain(newest)

    def _retain(self, newest: str) -> None:
        """Generations older than the newest `keep` ones go, once the newest is complete
        (named by a head record, which is written after its files). Never with --append-only."""
        if self.append_only or self.keep <= 0:
            return
        n = generation_number(newest) or 0
        gens = sorted(g for g in os.listdir(self.root) if is_generation_name(g) and (generation_number(g) or 0) <= n)
        for g in gens[: max(0, len(gens) - self.keep)]:
            gone = os.path.join(self.root, g + DELETED_SUFFIX)
            os.rename(os.path.join(self.root, g), gone)
            fsync_dir(self.root)
            shutil.rmtree(gone, ignore_errors=True)

    def close(self) -> None:
        try:
            self._sync_open()
        except OSError:
            pass
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # the lock goes with it
            self._lock_fd = None


def _same(a: str, b: str) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 16), fb.read(1 << 16)
            if x != y:
                return False
            if not x:
                return True


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n

