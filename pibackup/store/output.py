"""Writing a database out of a backup: the output path checked, a snapshot copied with its
checksum verified, the finished file synced and renamed into place (restore's tmp-sync-rename).

Both modes' restores and compaction's child use these; none of them decides what is replayed.
"""

from __future__ import annotations

import hashlib
import os
import stat
from typing import Optional

from pibackup.errors import DamageError
from pibackup.store.fsio import fsync_dir, fsync_file, private_file
from pibackup.store.replay import RestoreError

_CHUNK = 1 << 20


def copy_snapshot(src: str, target: str, expected: bytes, sync_every: int = 0) -> None:
    """Copy a snapshot, checking its SHA-256. `sync_every` bytes, the copy is synced: a
    compaction's copy then never leaves a large batch of dirty pages for one sync, which
    the hook's own syncs would wait behind."""
    h = hashlib.sha256()
    written = 0
    with open(src, "rb") as fi, os.fdopen(private_file(target), "wb") as fo:
        while True:
            b = fi.read(_CHUNK)
            if not b:
                break
            h.update(b)
            fo.write(b)
            written += len(b)
            if sync_every and written >= sync_every:
                fo.flush()
                os.fdatasync(fo.fileno())
                written = 0
    if h.digest() != expected:
        raise DamageError(f"{src}: snapshot is damaged (its SHA-256 does not match the journal's header)", src, None)


def check_output(output: str, force: bool) -> None:
    """OUTPUT_DB can be written: its directory exists, and it does not (or --force)."""
    out_dir = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(out_dir):
        raise RestoreError(f"{out_dir} does not exist; create it or choose another OUTPUT_DB")
    if os.path.lexists(output) and not force:
        raise RestoreError(
            f"{output} already exists; pibackup never overwrites a database unless told to. Stop lightningd, "
            "move the file away, or pass --force"
        )


def publish(tmp: str, output: str) -> None:
    """Sync a finished temporary database, rename it into place, sync its directory. A file
    it replaces (--force) hands on its mode and owner: lightningd's user must still own it."""
    try:
        st: Optional[os.stat_result] = os.stat(output)
    except FileNotFoundError:
        st = None
    if st is not None:
        if os.geteuid() == 0 and (st.st_uid, st.st_gid) != (os.getuid(), os.getgid()):
            os.chown(tmp, st.st_uid, st.st_gid)
        os.chmod(tmp, stat.S_IMODE(st.st_mode))
    fsync_file(tmp)
    os.replace(tmp, output)
    fsync_dir(os.path.dirname(output))


def remove_tmp(tmp: str) -> None:
    for stale in (tmp, tmp + "-journal", tmp + "-wal", tmp + "-shm"):
        if os.path.lexists(stale):
            os.unlink(stale)
