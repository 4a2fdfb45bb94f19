"""Snapshots of the live database through SQLite's online backup API.

A separate read-only connection, one short read transaction; never a file copy of the live DB.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import urllib.parse
from typing import Iterable

from pibackup.errors import PibackupError
from pibackup.store import snapfile
from pibackup.store.fsio import fsync_dir, fsync_file, private_file
from pibackup.store.layout import SNAPSHOT_TMP, plain_snapshot_filename, snapshot_filename

_CHUNK = 1 << 20


class SnapshotError(PibackupError):
    pass


def connect_readonly(path: str, timeout: float = 5.0) -> sqlite3.Connection:
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
    return sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None)


def read_data_version(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT intval FROM vars WHERE name = 'data_version'").fetchone()
    if row is None or row[0] is None:
        raise SnapshotError("the database has no data_version in its vars table: is it a Core Lightning database?")
    return int(row[0]) & 0xFFFFFFFF


def live_data_version(live_db: str, timeout: float = 5.0) -> int:
    """The data_version lightningd has committed, read in one short read transaction."""
    try:
        conn = connect_readonly(live_db, timeout)
        try:
            return read_data_version(conn)
        finally:
            conn.close()
    except sqlite3.Error as e:
        raise SnapshotError(f"cannot read the live database {live_db}: {e}") from e


def sha256_file(path: str) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(_CHUNK)
            if not b:
                return h.digest()
            h.update(b)


def take_snapshot(
    live_db: str, directory: str, strip: Iterable[str] = (), busy_timeout: float = 5.0, compress: bool = True
) -> tuple[str, int, bytes]:
    """Copy the live DB into `directory` with the backup API; sync it; name it by its version.
    `compress`: a journal generation's snapshot, written compressed (store/snapfile.py) from the
    copy, which is then removed; without, the plain copy (a replica).

    Tables in `strip` (the filtered ones) keep their schema and lose their rows in the copy.

    Returns (path, data_version, sha256). lightningd is blocked on us whenever this runs
    (at init, or inside a hook call), so the copy cannot race a commit.
    """
    tmp = os.path.join(directory, SNAPSHOT_TMP)
    os.close(private_file(tmp))  # the backup API then writes into this file, keeping its mode
    try:
        src = connect_readonly(live_db, busy_timeout)
        try:
            dst = sqlite3.connect(tmp, isolation_level=None)
            try:
                # In steps, so the read lock is dropped between them; lightningd cannot
                # commit meanwhile (it waits on this plugin), so the copy never restarts.
                src.backup(dst, pages=4096, sleep=0.01)
                version = read_data_version(dst)
                identity = snapfile.identity_rows(dst)
                for table in sorted(strip):
                    if dst.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (table,)).fetchone():
                        dst.execute("PRAGMA foreign_keys = ON")
                        dst.execute(f'DELETE FROM "{table}"')
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.OperationalError as e:
        if "locked" in str(e) or "busy" in str(e):
            raise SnapshotError(
                f"the live database {live_db} is locked, so no snapshot could be taken now; "
                "restart lightningd and pibackup takes it at start-up"
            ) from e
        raise SnapshotError(f"snapshot of {live_db} failed: {e}") from e
    except sqlite3.Error as e:
        raise SnapshotError(f"snapshot of {live_db} failed: {e}") from e
    if compress:
        final = os.path.join(directory, snapshot_filename(version))
        digest = snapfile.write_compressed(tmp, final, version, identity).sha256
        os.unlink(tmp)
        fsync_dir(directory)
        return final, version, digest
    fsync_file(tmp)
    digest = sha256_file(tmp)
    final = os.path.join(directory, plain_snapshot_filename(version))
    os.rename(tmp, final)
    fsync_dir(directory)
    return final, version, digest
