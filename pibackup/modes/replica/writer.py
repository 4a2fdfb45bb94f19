"""Replica mode: a second SQLite database on the backup medium kept in step with lightningd's,
one SQLite transaction per data_version, under the same sequence rules as the journal.

The newest transaction is not known committed until lightningd's next call (it may be
rewound), so it is stored, not applied: in the replica's own table `pibackup_replica`,
in the same SQLite transaction that applies the one before it. Each call is one durable
commit (WAL, synchronous=FULL), so a crash leaves the replica at a known data_version.
Layout and rules: FORMAT.md, "Replica mode".
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Tuple

from pibackup.errors import PibackupError
from pibackup.modes.api import BehindError, Call, Counters, Log
from pibackup.modes.journal.restore import RestoreError, check_output, publish, remove_tmp
from pibackup.rules import filter as flt
from pibackup.rules import replayguard
from pibackup.rules.replayguard import GuardedConnection, Refused, check_frame
from pibackup.rules.sequence import Action, classify, is_pragma_only, reconcile
from pibackup.store import directory as dst
from pibackup.store.chain import DamageError
from pibackup.store.fsio import io_error_message
from pibackup.store.journal import decode_statements, encode_statements, fsync_dir
from pibackup.store.snapshot import live_data_version, private_file, read_data_version, take_snapshot

REPLICA_FILE = "replica.sqlite3"
STATE_TABLE = "pibackup_replica"
_DIR = re.compile(r"^replica-(\d{6})$")
_PARTIAL = re.compile(r"^replica-(\d{6})\.(partial|deleted)$")
_ANY = re.compile(r"^replica-(\d{6})(\..*)?$")  # complete, partial, deleted or set aside as damaged
_SCHEMA = (
    f"CREATE TABLE {STATE_TABLE} (id INTEGER PRIMARY KEY CHECK (id = 1), applied INTEGER NOT NULL, "
    "pending_version INTEGER, pending BLOB, filter_tables TEXT NOT NULL, pibackup TEXT NOT NULL, pending_fk INTEGER)"
)
# pending_fk: lightningd's foreign_keys setting when the pending transaction was stored (a
# migration runs some with foreign keys off); NULL in replicas made before it existed: on.


class ReplicaError(PibackupError):
    pass


def replica_dirs(path: str) -> List[Tuple[int, str]]:
    """Complete replica directories, oldest first."""
    out = []
    for name in sorted(os.listdir(path)):
        m = _DIR.match(name)
        if m and os.path.exists(os.path.join(path, name, REPLICA_FILE)):
            out.append((int(m.group(1)), os.path.join(path, name)))
    return out


def is_replica_backup(path: str) -> bool:
    try:
        return any(_DIR.match(n) for n in os.listdir(path))
    except OSError:
        return False


def _connect(path: str) -> GuardedConnection:
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


def _refused(where: str, version: int, e: Refused) -> DamageError:
    return DamageError(
        f"{where}: pending transaction data_version {version}: {e}. The replica was changed after pibackup wrote it "
        "(tampering, or a bug)",
        where,
        None,
    )


def _refused_pending(where: str, state: ReplicaState) -> Optional[DamageError]:
    """The replica's pending transaction as damage, if the replay guard refuses it."""
    if state.pending_version is None:
        return None
    try:
        check_frame(state.pending or [], False)
    except Refused as e:
        return _refused(where, state.pending_version, e)
    return None


def _damage(e: sqlite3.Error) -> bool:
    """An SQLite error that says the file is not (or no longer) a sound database, as
    opposed to a medium that cannot be read or written."""
    return (getattr(e, "sqlite_errorcode", 0) & 0xFF) in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT)


class Replica:
    """The replica writer behind the db_write hook (the journal's Backup, for replica mode)."""

    def __init__(self, destination: str, live_db: str, log: Log, *, filter_tables: FrozenSet[str]):
        self.destination = destination
        self.live_db = live_db
        self.log = log
        self.filter_tables = frozenset(filter_tables)
        self.dest = dst.Destination(destination)
        self.conn: Optional[GuardedConnection] = None
        self.generation: Optional[str] = None  # the replica-NNNNNN directory
        self.last: Optional[int] = None
        self.last_is_journaled = False  # the newest transaction is pending (may be rewound)
        self.counters = Counters()
        self.failure: Optional[str] = None
        self.last_flush: Optional[float] = None
        self.compactor = None  # no compaction in replica mode: the replica never grows past the DB
        self._lock = threading.Lock()
        self._place: Optional[Tuple[Tuple[int, int], Tuple[int, int]]] = None  # (dir, file) (st_dev, st_ino)
        # lightningd's foreign_keys setting, as its PRAGMA calls leave it (on at each of its
        # starts), and the one the pending transaction was stored under (None: no pending).
        self._lightningd_fk = True
        self._pending_fk: Optional[bool] = None

    # --- start-up --------------------------------------------------------------------
    def start(self, early: Sequence[Call]) -> None:
        dst.validate(self.destination)
        if self.dest_has_journal():
            raise dst.DestinationError(
                f"{self.destination} holds a journal-mode backup (gen-NNNNNN directories); pibackup-mode=replica needs "
                "a directory of its own: give an empty pibackup-destination, or set pibackup-mode=journal"
            )
        try:
            self.dest.prepare()
            for name in os.listdir(self.destination):
                if _PARTIAL.match(name):
                    shutil.rmtree(os.path.join(self.destination, name))
            with self._lock:
                self._start(early)
        except OSError as e:
            raise dst.DestinationError(io_error_message(e, self.destination)) from e
        except sqlite3.Error as e:
            raise ReplicaError(self._sqlite_message(e)) from e

    def dest_has_journal(self) -> bool:
        try:
            return any(n.startswith("gen-") for n in os.listdir(self.destination))
        except OSError:
            return False

    def _start(self, early: Sequence[Call]) -> None:
        live = live_data_version(self.live_db)
        dirs = replica_dirs(self.destination)
        calls = [(c.data_version, is_pragma_only(c.writes)) for c in early]
        if not dirs:
            fresh = bool(early) and early[0].data_version == 1 and not calls[0][1]
            self._new_replica(snapshot=not (fresh and reconcile(0, False, calls, live) is Action.APPEND))
            self._replay_early(early)
            return
        number, path = dirs[-1]
        opened = self._open_existing(path)
        if isinstance(opened, str):  # what is wrong with it
            self._set_aside_damaged(path, opened, live)
            self._new_replica(snapshot=True)
            self._replay_early(early)
            return
        state = opened
        if state.filter_tables != ",".join(sorted(self.filter_tables)):
            self.log(
                f"pibackup-filter-tables changed (the replica in {path} filters {state.filter_tables or 'nothing'}): "
                "building a new replica from a snapshot, so that one replica never mixes the two",
                "warn",
            )
            self._new_replica(snapshot=True)
            self._replay_early(early)
            return
        action = reconcile(state.last, state.pending_version is not None, calls, live)
        if action is Action.BEHIND:
            raise BehindError(
                f"lightningd's database {self.live_db} (data_version {live}) is OLDER than the replica in {path} "
                f"(data_version {state.last}). Running on it could lose funds. Stop lightningd and restore the newer "
                f"state: pibackup restore {self.destination} {self.live_db} --force (after moving the old file away). "
                "The replica was left untouched"
            )
        if action is Action.GAP:
            self.log(
                f"the replica ends at data_version {state.last} and cannot be continued (live database at {live}): "
                "building a new replica from a snapshot",
                "warn",
            )
            self._new_replica(snapshot=True)
        else:
            conn = _connect(os.path.join(path, REPLICA_FILE))  # the first write to it, now that it is ours to go on
            self.conn, self.generation = conn, path
            self.last, self.last_is_journaled = state.last, state.pending_version is not None
            if "pending_fk" not in [r[1] for r in conn.execute(f"PRAGMA table_info({STATE_TABLE})")]:
                conn.execute(f"ALTER TABLE {STATE_TABLE} ADD COLUMN pending_fk INTEGER")
            self._pending_fk = state.pending_fk if state.pending_version is not None else None
            self._remember_place()
        self._replay_early(early)

    @staticmethod
    def _open_existing(path: str) -> Any:
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
                if not _damage(e):
                    raise
                return str(e)
        try:
            conn = sqlite3.connect(f"file:{f}?mode=ro", uri=True, isolation_level=None)
        except sqlite3.Error as e:
            if not _damage(e):
                raise
            return str(e)
        try:
            state = read_state(conn)
            refused = _refused_pending(f, state)
            return state if refused is None else str(refused)
        except ReplicaError as e:
            cause = e.__cause__
            schema = isinstance(cause, sqlite3.Error) and (getattr(cause, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_ERROR
            if isinstance(cause, sqlite3.Error) and not (_damage(cause) or schema):
                raise cause from None  # the medium, not the file: busy, I/O error, cannot open
            return str(e)
        finally:
            conn.close()

    def _set_aside_damaged(self, path: str, problem: str, live: int) -> None:
        """A replica that cannot be read is renamed replica-NNNNNN.damaged (never deleted),
        unless the live database may be older than it: then the node is refused."""
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
                f"the replica in {path} cannot be used ({problem}), and lightningd's database {self.live_db} "
                f"(data_version {live}) is OLDER than what it holds (data_version {held}). Running on it could lose "
                "funds. Stop lightningd; see `pibackup verify` and README, Restoring. The replica was left untouched"
            )
        aside = path + ".damaged"
        k = 1
        while os.path.lexists(aside):
            k += 1
            aside = f"{path}.damaged{k}"
        os.rename(path, aside)
        fsync_dir(self.destination)
        self.log(
            f"{path}: {problem}. It is kept as {os.path.basename(aside)} (delete it once you no longer need it) "
            "and a new replica is built from the live database",
            "warn",
        )

    def _remember_place(self) -> None:
        assert self.generation is not None
        d = os.stat(self.destination)
        f = os.stat(os.path.join(self.generation, REPLICA_FILE))
        self._place = ((d.st_dev, d.st_ino), (f.st_dev, f.st_ino))

    def _check_in_place(self) -> None:
        """The directory and the replica must still be where we opened them: after a stick
        is unplugged (or lazily unmounted) or the directory deleted, SQLite's commits and
        syncs succeed into files nobody will see again (journal mode: the same check, and why
        inode numbers are sound there even on FAT and exFAT: the lock directory and SQLite's
        open file pin both inodes)."""
        if self._place is None or self.generation is None:
            return
        try:
            d = os.stat(self.destination)
            f = os.stat(os.path.join(self.generation, REPLICA_FILE))
        except FileNotFoundError as e:
            raise FileNotFoundError(errno.ENOENT, "the backup directory vanished", self.destination) from e
        if ((d.st_dev, d.st_ino), (f.st_dev, f.st_ino)) != self._place:
            raise OSError(errno.ESTALE, "the backup directory was replaced (stick unplugged?)", self.destination)

    def _replay_early(self, early: Sequence[Call]) -> None:
        for c in early:
            a = classify(self.last, c.data_version, is_pragma_only(c.writes), self.last_is_journaled)
            if a in (Action.GAP, Action.BEHIND):
                continue  # already in the snapshot just taken
            self._apply(a, c.data_version, c.writes)

    def _new_replica(self, snapshot: bool) -> None:
        """Build replica-NNNNNN.partial (a snapshot of the live DB, or an empty database for a
        new node), make it durable, rename it into place, then drop the older one."""
        dirs = replica_dirs(self.destination)
        taken = [int(m.group(1)) for m in map(_ANY.match, os.listdir(self.destination)) if m]
        number = max(taken) + 1 if taken else 1
        final = os.path.join(self.destination, f"replica-{number:06d}")
        partial = final + ".partial"
        os.mkdir(partial, 0o700)
        try:
            target = os.path.join(partial, REPLICA_FILE)
            if snapshot:
                path, version, _ = take_snapshot(self.live_db, partial, strip=self.filter_tables)
                os.rename(path, target)
            else:
                version = 0
                os.close(private_file(target))  # the node's channel state: its owner's only
            conn = _connect(target)
            try:
                conn.execute(_SCHEMA)
                conn.execute(
                    f"INSERT INTO {STATE_TABLE} VALUES (1, ?, NULL, NULL, ?, ?, NULL)",
                    (version, ",".join(sorted(self.filter_tables)), _release()),
                )
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                conn.close()
            fsync_dir(partial)
            os.rename(partial, final)
            fsync_dir(self.destination)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        if self.conn is not None:
            self.conn.close()
        self.conn = _connect(os.path.join(final, REPLICA_FILE))
        self.generation = final
        self.last, self.last_is_journaled = version, False
        self._pending_fk = None
        self.counters.generations_started += 1
        self._remember_place()
        for _, old in dirs:  # the new replica is complete and synced: the old ones can go
            try:
                doomed = old + ".deleted"
                os.rename(old, doomed)
                fsync_dir(self.destination)
                shutil.rmtree(doomed)
            except OSError as e:  # the new one is complete: a leftover costs space, not safety
                self.log(f"could not delete the old replica {old}: {io_error_message(e, old)}; it goes at the next start", "warn")
        what = f"a snapshot at data_version {version}" if snapshot else "an empty database (new node)"
        self.log(f"started replica {os.path.basename(final)} from {what}", "info")

    # --- the hot path ----------------------------------------------------------------
    def write(self, data_version: int, writes: List[str]) -> None:
        with self._lock:
            if self.failure is not None:
                raise dst.DestinationError(self.failure)
            try:
                self._write(data_version, writes)
            except OSError as e:
                raise dst.DestinationError(io_error_message(e, self.generation or self.destination)) from e
            except sqlite3.Error as e:
                raise ReplicaError(self._sqlite_message(e)) from e

    def _write(self, data_version: int, writes: List[str]) -> None:
        pragma = is_pragma_only(writes)
        replayguard.check_call(data_version, writes, pragma)
        a = classify(self.last, data_version, pragma, self.last_is_journaled)
        if a is Action.GAP:
            self.log(
                f"gap: replica ends at data_version {self.last}, lightningd sent {data_version}; "
                "taking a snapshot of the live database",
                "warn",
            )
            self._new_replica(snapshot=True)
            a = classify(self.last, data_version, pragma, False)
            if a is not Action.APPEND and a is not Action.PRAGMA:
                raise BehindError(
                    f"after a new snapshot at data_version {self.last} lightningd's call {data_version} still does not "
                    "follow; restart lightningd"
                )
        if a is Action.BEHIND:
            raise BehindError(
                f"lightningd's database (data_version {data_version}) is OLDER than the replica in {self.generation} "
                f"(data_version {self.last}); stop lightningd and restore the newer state with pibackup restore"
            )
        try:
            self._apply(a, data_version, writes)
        except DamageError as e:
            # The pending transaction read back from the medium was altered there. lightningd
            # committed it (this call proves it): the live database holds it, so a new replica
            # from a snapshot of it loses nothing; the altered one is kept aside.
            assert self.generation is not None and self.conn is not None
            self.conn.close()
            self.conn = None
            self._set_aside_damaged(self.generation, str(e), live_data_version(self.live_db))
            self._new_replica(snapshot=True)
            a = classify(self.last, data_version, pragma, False)
            if a is not Action.APPEND and a is not Action.PRAGMA:
                raise BehindError(
                    f"after a new snapshot at data_version {self.last} lightningd's call {data_version} does not follow; "
                    "restart lightningd"
                ) from e
            self._apply(a, data_version, writes)

    def _apply(self, a: Action, data_version: int, writes: List[str]) -> None:
        """One SQLite transaction: apply the pending transaction if this call proves it
        committed, and store this one as pending (or replace it, for a rewind)."""
        c = self.conn
        assert c is not None
        # The pending transaction is applied as lightningd ran it (a migration's table
        # rebuild runs with foreign keys off); PRAGMA foreign_keys is a no-op in a transaction.
        self._set_fk(c, self._lightningd_fk if self._pending_fk is None else self._pending_fk)
        if a is Action.PRAGMA:
            c.execute("BEGIN IMMEDIATE")
            try:
                self._apply_pending(c)
                c.execute(
                    f"UPDATE {STATE_TABLE} SET applied = ?, pending_version = NULL, pending = NULL, pending_fk = NULL WHERE id = 1",
                    (data_version,),
                )
                c.execute("COMMIT")
            except BaseException:
                self._rollback(c)
                raise
            self._pending_fk = None
            for s in writes:
                c.replay(s)  # outside a transaction, as lightningd runs them
            self._lightningd_fk = bool(c.execute("PRAGMA foreign_keys").fetchone()[0])
            self.last_is_journaled = False
        else:
            cl = flt.classify(writes, self.filter_tables)
            self.counters.statements_dropped += cl.dropped
            fk = int(self._lightningd_fk)
            c.execute("BEGIN IMMEDIATE")
            try:
                if a is Action.APPEND:
                    self._apply_pending(c)
                else:
                    self.counters.rewinds += 1
                    self.log(f"data_version {data_version} sent again: the earlier one was never committed; replaced", "info")
                if a is Action.APPEND:  # the pending one (if any) is applied now: `last` is applied
                    c.execute(
                        f"UPDATE {STATE_TABLE} SET applied = ?, pending_version = ?, pending = ?, pending_fk = ? WHERE id = 1",
                        (self.last, data_version, encode_statements(cl.writes), fk),
                    )
                else:  # a rewind: the pending one is replaced, never applied
                    c.execute(
                        f"UPDATE {STATE_TABLE} SET pending_version = ?, pending = ?, pending_fk = ? WHERE id = 1",
                        (data_version, encode_statements(cl.writes), fk),
                    )
                c.execute("COMMIT")
            except BaseException:
                self._rollback(c)
                raise
            self.last, self.last_is_journaled = data_version, True
            self._pending_fk = bool(fk)
            if cl.critical:
                self.counters.critical_frames += 1
            else:
                self.counters.bulk_frames += 1
        self._check_in_place()  # before the answer: a commit into a detached file is no backup
        self.counters.frames += 1
        self.counters.syncs += 1
        self.last_flush = time.time()

    @staticmethod
    def _set_fk(c: sqlite3.Connection, on: bool) -> None:
        if bool(c.execute("PRAGMA foreign_keys").fetchone()[0]) != on:
            c.execute(f"PRAGMA foreign_keys = {'ON' if on else 'OFF'}")

    def _apply_pending(self, c: GuardedConnection) -> None:
        row = c.execute(f"SELECT pending_version, pending FROM {STATE_TABLE} WHERE id = 1").fetchone()
        if row is None or row[0] is None:
            return
        where = os.path.join(self.generation or "", REPLICA_FILE)
        statements = decode_statements(row[1])
        try:
            check_frame(statements, False)
        except Refused as e:
            raise _refused(where, int(row[0]), e) from e
        for s in statements:
            try:
                c.replay(s)
            except Refused as e:
                raise _refused(where, int(row[0]), e) from e
            except sqlite3.Error as e:
                raise ReplicaError(
                    f"the replica cannot apply data_version {row[0]}: {e} (statement: {s[:160]!r}); it no longer matches "
                    "lightningd's database. Move the replica directory away and restart lightningd to build a new one"
                ) from e

    @staticmethod
    def _rollback(c: sqlite3.Connection) -> None:
        if c.in_transaction:
            c.execute("ROLLBACK")

    def _sqlite_message(self, e: sqlite3.Error) -> str:
        code = getattr(e, "sqlite_errorcode", 0) & 0xFF
        if code == sqlite3.SQLITE_FULL:
            return f"cannot write the replica in {self.generation}: the backup medium is full; free space on it or replace it"
        if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN):
            return (
                f"cannot write the replica in {self.generation}: {e} (the medium may be read-only, failing or unplugged; "
                "check it or replace it)"
            )
        return f"replica in {self.generation}: SQLite says {e}"

    # --- the rest of Backup's interface ----------------------------------------------------
    def flush(self) -> None:
        """Every call is already durable."""

    def close(self) -> None:
        """At the end: if the live DB holds the pending transaction's data_version, it was
        committed: apply it (the replica's commit mark)."""
        with self._lock:
            c = self.conn
            try:
                if c is not None and self.failure is None and self.last_is_journaled:
                    try:
                        live = live_data_version(self.live_db, timeout=1.0)
                    except PibackupError:
                        live = None
                    if live == self.last:
                        self._set_fk(c, self._pending_fk is not False)
                        c.execute("BEGIN IMMEDIATE")
                        try:
                            self._apply_pending(c)
                            c.execute(
                                f"UPDATE {STATE_TABLE} SET applied = ?, pending_version = NULL, pending = NULL, "
                                "pending_fk = NULL WHERE id = 1",
                                (live,),
                            )
                            c.execute("COMMIT")
                            self.last_is_journaled = False
                        except (sqlite3.Error, PibackupError) as e:
                            self._rollback(c)
                            self.log(f"could not mark the last transaction committed in the replica: {e}", "warn")
                if c is not None and self.failure is None:
                    # Everything into the main file, and back to a rollback journal: a WAL
                    # database without its -shm cannot be opened on a read-only medium, which
                    # is how a restore may find it.
                    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                    c.execute("PRAGMA journal_mode = DELETE")
            except sqlite3.Error as e:
                self.log(f"replica: {e}", "warn")
            finally:
                if c is not None:
                    c.close()
                self.conn = None
                self.dest.close()

    def generation_count(self) -> int:
        try:
            return len(replica_dirs(self.destination))
        except OSError:
            return 0

    def open_segment(self) -> None:
        return None

    def status(self) -> Dict[str, Any]:
        try:
            st = os.statvfs(self.destination)
            free: Optional[int] = st.f_bavail * st.f_frsize
        except OSError:
            free = None
        with self._lock:
            return {
                "destinations": [
                    {
                        "path": self.destination,
                        "free_bytes": free,
                        "generations": self.generation_count(),
                        "last_write": None if self.last_flush is None else int(self.last_flush),
                    }
                ],
                "destination": self.destination,
                "live_db": self.live_db,
                "generation": os.path.basename(self.generation or ""),
                "replica": os.path.join(self.generation or "", REPLICA_FILE),
                "data_version": self.last,
                "filter_tables": sorted(self.filter_tables),
                "pending_bulk_bytes": 0,
                "counters": asdict(self.counters),
                "compaction": "not used in replica mode",
            }


def _release() -> str:
    from pibackup import __version__

    return __version__


# --- restore and verify -------------------------------------------------------------------
@dataclass
class ReplicaOutcome:
    replica: str
    applied: int
    last_version: int
    pending_applied: bool
    filtered_tables: List[str]
    rescan_from: Optional[int] = None


def newest_replica(backup_dir: str) -> str:
    dst.refuse_foreign(backup_dir)  # as a journal backup: nothing another user planted is restored
    dirs = replica_dirs(backup_dir)
    if not dirs:
        raise RestoreError(f"{backup_dir} holds no complete replica yet")
    return os.path.join(dirs[-1][1], REPLICA_FILE)


def restore_replica(backup_dir: str, output: str, force: bool = False) -> ReplicaOutcome:
    """A verified copy of the newest replica: copied with SQLite's backup API to
    OUTPUT.pibackup-tmp, its pending transaction applied (as a journal restore applies its
    last one), pibackup's table dropped, checked, synced, renamed."""
    src = newest_replica(backup_dir)
    output = os.path.abspath(output)
    check_output(output, force)
    if os.path.lexists(output) and force and dst.writer_running(backup_dir):
        raise RestoreError(
            f"a running pibackup (inside lightningd) is writing {backup_dir}: stop lightningd before you replace {output}"
        )
    tmp = output + ".pibackup-tmp"
    remove_tmp(tmp)
    try:
        source = sqlite3.connect(f"file:{src}?mode=ro", uri=True, isolation_level=None)
        try:
            os.close(private_file(tmp))  # the backup API writes into it and keeps its mode
            out_conn = sqlite3.connect(tmp, isolation_level=None)
            try:
                source.backup(out_conn)
            finally:
                out_conn.close()
        finally:
            source.close()
        conn = replayguard.connect(tmp, protected={STATE_TABLE}, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = DELETE")
            conn.execute("PRAGMA foreign_keys = ON")
            state = read_state(conn)
            refused = _refused_pending(src, state)
            if refused is not None:
                raise refused
            if not state.pending_fk:  # stored inside a migration that runs with foreign keys off
                conn.execute("PRAGMA foreign_keys = OFF")
            conn.execute("BEGIN")
            for s in state.pending or []:
                try:
                    conn.replay(s)
                except Refused as e:
                    raise _refused(src, state.last, e) from e
            conn.execute(f"DROP TABLE {STATE_TABLE}")
            conn.execute("COMMIT")
            conn.execute("PRAGMA foreign_keys = ON")
            got = read_data_version(conn) if state.last else 0
            if got != state.last:
                raise RestoreError(f"restored replica says data_version {got} but its state says {state.last}: run `pibackup verify`")
            row = conn.execute("PRAGMA integrity_check").fetchone()
            if row is None or row[0] != "ok":
                raise RestoreError(f"the replica fails SQLite's integrity check: {row[0] if row else '?'}")
            bad = conn.execute("PRAGMA foreign_key_check").fetchmany(3)
            if bad:
                raise RestoreError(f"the replica has dangling foreign keys, e.g. {bad}")
            filtered = [t for t in state.filter_tables.split(",") if t]
            rescan = None
            if "utxoset" in filtered:
                row = conn.execute("SELECT MIN(height) FROM blocks").fetchone()
                rescan = row[0] if row else None
        finally:
            conn.close()
        publish(tmp, output)
    except sqlite3.Error as e:
        remove_tmp(tmp)
        raise RestoreError(f"cannot restore from the replica {src}: SQLite says {e}") from e
    except BaseException:
        remove_tmp(tmp)
        raise
    return ReplicaOutcome(src, state.applied, state.last, state.pending is not None, filtered, rescan)


def verify_replica(backup_dir: str) -> Tuple[List[str], bool]:
    dst.refuse_foreign(backup_dir)
    lines: List[str] = []
    damaged = False
    for _, path in replica_dirs(backup_dir):
        f = os.path.join(path, REPLICA_FILE)
        try:
            conn = sqlite3.connect(f"file:{f}?mode=ro", uri=True, isolation_level=None)
            try:
                state = read_state(conn)
                row = conn.execute("PRAGMA integrity_check").fetchone()
            finally:
                conn.close()
        except (sqlite3.Error, ReplicaError) as e:
            lines.append(f"{os.path.basename(path)}: DAMAGED: {e}")
            damaged = True
            continue
        pend = f", data_version {state.pending_version} pending" if state.pending_version is not None else ""
        lines.append(f"{os.path.basename(path)}: replica at data_version {state.applied}{pend}")
        refused = _refused_pending(f, state)
        if refused is not None:
            lines.append(f"  DAMAGED: {refused}")
            damaged = True
        if row is None or row[0] != "ok":
            lines.append(f"  DAMAGED: integrity check: {row[0] if row else '?'}")
            damaged = True
    return lines, damaged
