"""Replica mode's state on the medium: the state table and how it is read, how a replica is
built or set aside, and the refusals its pending transaction can meet (FORMAT.md, "Replica mode").
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from dataclasses import dataclass
from typing import FrozenSet, List, Optional, Tuple, Union

from pibackup.errors import DamageError, PibackupError
from pibackup.modes.api import BehindError
from pibackup.rules import replayguard
from pibackup.rules.replayguard import GuardedConnection, Refused, check_frame
from pibackup.store.fsio import fsync_dir, private_file
from pibackup.store.layout import DAMAGED_SUFFIX, PARTIAL_SUFFIX, REPLICA_ANY_RE, REPLICA_FILE, replica_dirname
from pibackup.store.segment import decode_statements
from pibackup.store.snapshot import read_data_version, take_snapshot

STATE_TABLE = "pibackup_replica"
_SCHEMA = (
    f"CREATE TABLE {STATE_TABLE} (id INTEGER PRIMARY KEY CHECK (id = 1), applied INTEGER NOT NULL, "
    "pending_version INTEGER, pending BLOB, filter_tables TEXT NOT NULL, pibackup TEXT NOT NULL, pending_fk INTEGER)"
)
# pending_fk: lightningd's foreign_keys setting when the pending transaction was stored (a
# migration runs some with foreign keys off); NULL in replicas made before it existed: on.


class ReplicaError(PibackupError):
    pass


def connect(path: str) -> GuardedConnection:
    # lightningd's statements (and the pending ones read back from the medium) go through the
    # replay guard; the replica's own state table is out of their reach.
    conn = replayguard.connect(path, protected={STATE_TABLE}, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA foreign_keys = ON")  # as lightningd's own connection
    conn.execute("PRAGMA journal_mode = WAL")  # one sync per commit
    conn.execute("PRAGMA synchronous = FULL")  # every commit durable before the hook answers
    # Checkpoint every 256 pages and cut the WAL back to 1 MiB afterwards: SQLite's default
    # (1000 pages, never truncated) leaves a WAL of 4 MiB or more next to a small database.
    conn.execute("PRAGMA wal_autocheckpoint = 256")
    conn.execute(f"PRAGMA journal_size_limit = {1 << 20}")
    return conn


@dataclass
class ReplicaState:
    applied: int  # data_version of the last transaction applied (known committed)
    pending_version: Optional[int]  # the newest transaction, stored and not applied yet
    pending: Optional[List[str]]
    filter_tables: str
    pending_fk: bool = True

    @property
    def last(self) -> int:
        return self.pending_version if self.pending_version is not None else self.applied


def read_state(conn: sqlite3.Connection) -> ReplicaState:
    try:
        cols = [r[1] for r in conn.execute(f"PRAGMA table_info({STATE_TABLE})")]
        fk = "pending_fk" if "pending_fk" in cols else "NULL"
        row = conn.execute(f"SELECT applied, pending_version, pending, filter_tables, {fk} FROM {STATE_TABLE} WHERE id = 1").fetchone()
    except sqlite3.Error as e:
        raise ReplicaError(f"not a pibackup replica ({e})") from e
    if row is None:
        raise ReplicaError("the replica's state row is missing")
    pending = decode_statements(row[2]) if row[2] is not None else None
    return ReplicaState(int(row[0]), None if row[1] is None else int(row[1]), pending, row[3], row[4] is None or bool(row[4]))


def refused(where: str, version: int, e: Refused) -> DamageError:
    return DamageError(
        f"{where}: pending transaction data_version {version}: {e}. The replica was changed after pibackup wrote it "
        "(tampering, or a bug)",
        where,
        None,
    )


def refused_pending(where: str, state: ReplicaState) -> Optional[DamageError]:
    """The replica's pending transaction as damage, if the replay guard refuses it."""
    if state.pending_version is None:
        return None
    try:
        check_frame(state.pending or [], False)
    except Refused as e:
        return refused(where, state.pending_version, e)
    return None


def is_damage(e: sqlite3.Error) -> bool:
    """An SQLite error that says the file is not (or no longer) a sound database, as
    opposed to a medium that cannot be read or written."""
    return (getattr(e, "sqlite_errorcode", 0) & 0xFF) in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT)


def open_existing(path: str) -> Union[ReplicaState, str]:
    """A replica's state, read without writing to it (a replica that is refused stays
    byte for byte as it was), or a description of its damage. Errors of the medium
    itself (read-only, I/O, full) are raised: they are not damage."""
    f = os.path.join(path, REPLICA_FILE)
    if os.path.exists(f + "-journal"):
        # A hot rollback journal (a crash while switching journal modes) must be rolled
        # back before anyone may read the file, and a read-only connection cannot.
        try:
            rw = sqlite3.connect(f, isolation_level=None)
            try:
                rw.execute("SELECT count(*) FROM sqlite_master").fetchone()
            finally:
                rw.close()
        except sqlite3.Error as e:
            if not is_damage(e):
                raise
            return str(e)
    try:
        conn = sqlite3.connect(f"file:{f}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error as e:
        if not is_damage(e):
            raise
        return str(e)
    try:
        state = read_state(conn)
        bad_pending = refused_pending(f, state)
        return state if bad_pending is None else str(bad_pending)
    except ReplicaError as e:
        cause = e.__cause__
        schema = isinstance(cause, sqlite3.Error) and (getattr(cause, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_ERROR
        if isinstance(cause, sqlite3.Error) and not (is_damage(cause) or schema):
            raise cause from None  # the medium, not the file: busy, I/O error, cannot open
        return str(e)
    finally:
        conn.close()


def set_aside_damaged(destination: str, path: str, problem: str, live: int, live_db: str) -> str:
    """A replica that cannot be read is renamed replica-NNNNNN.damaged (never deleted), unless
    the live database may be older than it: then the node is refused. Returns the new name."""
    held: Optional[int] = None
    try:
        c = sqlite3.connect(f"file:{os.path.join(path, REPLICA_FILE)}?mode=ro", uri=True, isolation_level=None)
        try:
            held = read_data_version(c)
        finally:
            c.close()
    except (sqlite3.Error, PibackupError):
        pass
    if held is not None and live < held:
        raise BehindError(
            f"the replica in {path} cannot be used ({problem}), and lightningd's database {live_db} "
            f"(data_version {live}) is OLDER than what it holds (data_version {held}). Running on it could lose "
            "funds. Stop lightningd; see `pibackup verify` and README, Restoring. The replica was left untouched"
        )
    aside = path + DAMAGED_SUFFIX
    k = 1
    while os.path.lexists(aside):
        k += 1
        aside = f"{path}.damaged{k}"
    os.rename(path, aside)
    fsync_dir(destination)
    return aside


def build_replica(destination: str, live_db: str, filter_tables: FrozenSet[str], snapshot: bool) -> Tuple[str, int]:
    """Build replica-NNNNNN.partial (a snapshot of the live DB, or an empty database for a new
    node) with its state row, make it durable and rename it into place: (its path, its data_version)."""
    taken = [int(m.group(1)) for m in map(REPLICA_ANY_RE.match, os.listdir(destination)) if m]
    number = max(taken) + 1 if taken else 1
    final = os.path.join(destination, replica_dirname(number))
    partial = final + PARTIAL_SUFFIX
    os.mkdir(partial, 0o700)
    try:
        target = os.path.join(partial, REPLICA_FILE)
        if snapshot:
            path, version, _ = take_snapshot(live_db, partial, strip=filter_tables, compress=False)
            os.rename(path, target)
        else:
            version = 0
            os.close(private_file(target))  # the node's channel state: its owner's only
        conn = connect(target)
        try:
            conn.execute(_SCHEMA)
            conn.execute(
                f"INSERT INTO {STATE_TABLE} VALUES (1, ?, NULL, NULL, ?, ?, NULL)",
                (version, ",".join(sorted(filter_tables)), release()),
            )
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
        fsync_dir(partial)
        os.rename(partial, final)
        fsync_dir(destination)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return final, version


def apply_pending(c: GuardedConnection, generation: Optional[str]) -> None:
    """Run the stored pending transaction (this call proved it committed), through the replay guard."""
    row = c.execute(f"SELECT pending_version, pending FROM {STATE_TABLE} WHERE id = 1").fetchone()
    if row is None or row[0] is None:
        return
    where = os.path.join(generation or "", REPLICA_FILE)
    statements = decode_statements(row[1])
    try:
        check_frame(statements, False)
    except Refused as e:
        raise refused(where, int(row[0]), e) from e
    for s in statements:
        try:
            c.replay(s)
        except Refused as e:
            raise refused(where, int(row[0]), e) from e
        except sqlite3.Error as e:
            raise ReplicaError(
                f"the replica cannot apply data_version {row[0]}: {e} (statement: {s[:160]!r}); it no longer matches "
                "lightningd's database. Move the replica directory away and restart lightningd to build a new one"
            ) from e


def rollback(c: sqlite3.Connection) -> None:
    if c.in_transaction:
        c.execute("ROLLBACK")


def sqlite_message(generation: Optional[str], e: sqlite3.Error) -> str:
    """An SQLite error of the replica, in words a Pi owner can act on."""
    code = getattr(e, "sqlite_errorcode", 0) & 0xFF
    if code == sqlite3.SQLITE_FULL:
        return f"cannot write the replica in {generation}: the backup medium is full; free space on it or replace it"
    if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN):
        return (
            f"cannot write the replica in {generation}: {e} (the medium may be read-only, failing or unplugged; "
            "check it or replace it)"
        )
    return f"replica in {generation}: SQLite says {e}"


def release() -> str:
    from pibackup import __version__

    return __version__
