"""lightningd's `emergency.recover` in a backup directory: where it is, its durable copy, and
the loose check a reader can make of it without the node's hsm_secret.

lightningd's chanbackup plugin writes the file as one libsodium secretstream message
(crypto_secretstream_xchacha20poly1305: a 24-byte header, then the ciphertext with its
17-byte tag) under a key derived from hsm_secret; it has no magic number of its own.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

from pibackup.store.fsio import fsync_dir
from pibackup.store.identity import identity_lines
from pibackup.store.layout import EMERGENCY_RECOVER, TMP_SUFFIX

SECRETSTREAM_HEADER = 24
SECRETSTREAM_TAG = 17
MIN_SIZE = SECRETSTREAM_HEADER + SECRETSTREAM_TAG  # an empty message: never a real one
MAX_SIZE = 16 << 20  # a few hundred bytes per channel: anything near this is not lightningd's file


def emergency_recover_path(backup_dir: str) -> Optional[str]:
    """The copy of lightningd's emergency.recover in a backup directory, or None when it holds
    none (a backup from before the file was copied, or a node that never wrote one)."""
    path = os.path.join(backup_dir, EMERGENCY_RECOVER)
    return path if os.path.isfile(path) and not os.path.islink(path) else None


def shape_problem(data: bytes) -> Optional[str]:
    """What makes `data` not lightningd's emergency.recover, as far as its length can tell."""
    if len(data) < MIN_SIZE:
        return f"{len(data)} bytes, shorter than the {MIN_SIZE} of an encrypted message with nothing in it"
    if len(data) > MAX_SIZE:
        return f"{len(data)} bytes, far more than a static channel backup holds"
    return None


def write_copy(backup_dir: str, data: bytes) -> None:
    """BACKUP_DIR/emergency.recover.tmp written and synced, renamed, the directory synced: a
    crash leaves the old copy or the new one, never a mix."""
    final = os.path.join(backup_dir, EMERGENCY_RECOVER)
    tmp = final + TMP_SUFFIX
    try:
        os.unlink(tmp)  # a leftover of a crash: made anew, never someone else's file or link
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, final)
    fsync_dir(backup_dir)


@dataclass(frozen=True)
class RecoverCopy:
    size: int
    sha256: str
    mtime: float


def check_copy(backup_dir: str) -> Tuple[Optional[RecoverCopy], List[str], bool]:
    """verify's look at the copy: (what it is, lines to print, damaged)."""
    path = os.path.join(backup_dir, EMERGENCY_RECOVER)
    if os.path.islink(path):
        return None, [f"DAMAGED: {path} is a symbolic link; pibackup never writes one"], True
    if not os.path.exists(path):
        return None, [f"{EMERGENCY_RECOVER}: none in this backup (lightningd had written none, or the backup predates it)"], False
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SIZE + 1)
            mtime = os.fstat(f.fileno()).st_mtime
    except OSError as e:
        return None, [f"DAMAGED: cannot read {path}: {e.strerror}"], True
    copy = RecoverCopy(len(data), hashlib.sha256(data).hexdigest(), mtime)
    problem = shape_problem(data)
    if problem is not None:
        return copy, [f"DAMAGED: {path} is not lightningd's emergency.recover: {problem}"], True
    return copy, [f"{EMERGENCY_RECOVER}: {copy.size} bytes, sha256 {copy.sha256} (encrypted with the node's hsm_secret)"], False


def check_node_files(backup_dir: str) -> Tuple[List[str], bool]:
    """verify's lines about the node's files: whose backup it is (NODE against the newest
    data) and its emergency.recover. (lines, damaged)."""
    lines, damaged = identity_lines(backup_dir)
    _, more, bad = check_copy(backup_dir)
    return lines + more, damaged or bad
