"""Writing a database out of a backup: the output path checked, a snapshot copied with its
checksum verified, the finished file synced and renamed into place (restore's tmp-sync-rename).

Both modes' restores and compaction's child use these; none of them decides what is replayed.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
from typing import Iterator, Optional

from pibackup.store import snapfile
from pibackup.store.directory import writer_running
from pibackup.store.fsio import fsync_dir, fsync_file
from pibackup.store.layout import RESTORE_TMP_SUFFIX
from pibackup.store.replay import RestoreError


def copy_snapshot(src: str, target: str, expected: bytes, sync_every: int = 0) -> None:
    """Write the database a snapshot holds (compressed or, format 1, plain) to `target`,
    checking it against its SHA-256. `sync_every` bytes, the copy is synced: a compaction's
    copy then never leaves a large batch of dirty pages for one sync, which the hook's own
    syncs would wait behind."""
    snapfile.expand(src, target, expected, sync_every)


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


def check_replace(backup_dir: str, output: str, force: bool) -> None:
    """check_output, and never replace (--force) a database while a writer runs: it is
    lightningd's own, in use."""
    check_output(output, force)
    if os.path.lexists(output) and force and writer_running(backup_dir):
        raise RestoreError(
            f"a running pibackup (inside lightningd) is writing {backup_dir}: stop lightningd before you replace "
            f"{output} (restoring to a new file is fine while it runs)"
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


@contextlib.contextmanager
def building(output: str, what: str) -> Iterator[str]:
    """The temporary file a restore builds `output` in (OUTPUT.pibackup-tmp): published when
    the block ends, removed on any error, so `output` is either complete or untouched.
    `what` completes "cannot ..." in the message of an SQLite error."""
    tmp = output + RESTORE_TMP_SUFFIX
    remove_tmp(tmp)
    try:
        yield tmp
        publish(tmp, output)
    except sqlite3.Error as e:
        remove_tmp(tmp)
        raise RestoreError(f"cannot {what}: SQLite says {e}") from e
    except BaseException:
        remove_tmp(tmp)
        raise


def check_database(conn: sqlite3.Connection, what: str) -> None:
    """SQLite's own checks of a database built by a restore: its pages, then its foreign keys
    (lightningd runs with them on, so a dangling one would break it later). `what` names it."""
    row = conn.execute("PRAGMA integrity_check").fetchone()
    if row is None or row[0] != "ok":
        raise RestoreError(f"{what} fails SQLite's integrity check: {row[0] if row else '?'}")
    bad = conn.execute("PRAGMA foreign_key_check").fetchmany(3)
    if bad:
        raise RestoreError(f"{what} has dangling foreign keys, e.g. {bad}")
