"""Replica mode: a second SQLite database on the backup medium kept in step with lightningd's,
one SQLite transaction per data_version, under the same sequence rules as the journal.

The newest transaction is not known committed until lightningd's next call (it may be
rewound), so it is stored, not applied: in the replica's own table `pibackup_replica`,
in the same SQLite transaction that applies the one before it. Each call is one durable
commit (WAL, synchronous=FULL), so a crash leaves the replica at a known data_version.
Layout and rules: FORMAT.md, "Replica mode".
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
import time
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Tuple

from pibackup.errors import DamageError, PibackupError
from pibackup.modes.api import BehindError, Call, CompactAnswer, Counters, Log
from pibackup.modes.common import (
    PlaceGuard,
    base_status,
    behind_message,
    committed_at_end,
    free_bytes,
    fresh_node,
    gate,
    open_directory,
    replay_early,
)
from pibackup.modes.replica.state import (
    STATE_TABLE,
    ReplicaError,
    apply_pending,
    build_replica,
    connect,
    open_existing,
    rollback,
    set_aside_damaged,
    sqlite_message,
)
from pibackup.rules import filter as flt
from pibackup.rules.replayguard import GuardedConnection
from pibackup.rules.sequence import Action, classify, is_pragma_only, reconcile
from pibackup.store import directory as dst
from pibackup.store.access import DestinationError
from pibackup.store.fsio import fsync_dir, io_error_message
from pibackup.store.layout import DELETED_SUFFIX, REPLICA_FILE, REPLICA_LEFTOVER_RE, holds_journal, replica_dirs
from pibackup.store.segment import encode_statements
from pibackup.store.snapshot import live_data_version


class ReplicaWriter:  # size: one lock guards the connection, its pending transaction and the fk state together
    """The replica writer behind the db_write hook (modes/api.py's Writer, for replica mode)."""

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
        self._lock = threading.Lock()
        self._place = PlaceGuard(destination)  # the directory and the replica file in it
        # lightningd's foreign_keys setting, as its PRAGMA calls leave it (on at each of its
        # starts), and the one the pending transaction was stored under (None: no pending).
        self._lightningd_fk = True
        self._pending_fk: Optional[bool] = None

    # --- start-up --------------------------------------------------------------------
    def start(self, early: Sequence[Call]) -> None:
        open_directory(
            self.dest,
            holds_journal,
            f"{self.destination} holds a journal-mode backup (gen-NNNNNN directories); pibackup-mode=replica needs "
            "a directory of its own: give an empty pibackup-destination, or set pibackup-mode=journal",
            self.live_db,
        )
        try:
            for name in os.listdir(self.destination):
                if REPLICA_LEFTOVER_RE.match(name):
                    shutil.rmtree(os.path.join(self.destination, name))
            with self._lock:
                self._start(early)
        except OSError as e:
            raise DestinationError(io_error_message(e, self.destination)) from e
        except sqlite3.Error as e:
            raise ReplicaError(sqlite_message(self.generation, e)) from e

    def _start(self, early: Sequence[Call]) -> None:
        live = live_data_version(self.live_db)
        dirs = replica_dirs(self.destination)
        if not dirs:
            self._new_replica(snapshot=not fresh_node(early, live))
            self._replay_early(early)
            return
        number, path = dirs[-1]
        opened = open_existing(path)
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
        calls = [(c.data_version, is_pragma_only(c.writes)) for c in early]
        action = reconcile(state.last, state.pending_version is not None, calls, live)
        if action is Action.BEHIND:
            held = f"the replica in {path} (data_version {state.last})"
            raise BehindError(behind_message(self.live_db, live, held, self.destination, "The replica"))
        if action is Action.GAP:
            self.log(
                f"the replica ends at data_version {state.last} and cannot be continued (live database at {live}): "
                "building a new replica from a snapshot",
                "warn",
            )
            self._new_replica(snapshot=True)
        else:
            conn = connect(os.path.join(path, REPLICA_FILE))  # the first write to it, now that it is ours to go on
            self.conn, self.generation = conn, path
            self.last, self.last_is_journaled = state.last, state.pending_version is not None
            if "pending_fk" not in [r[1] for r in conn.execute(f"PRAGMA table_info({STATE_TABLE})")]:
                conn.execute(f"ALTER TABLE {STATE_TABLE} ADD COLUMN pending_fk INTEGER")
            self._pending_fk = state.pending_fk if state.pending_version is not None else None
            self._place.remember(self.destination, os.path.join(path, REPLICA_FILE))
        self._replay_early(early)

    def _set_aside_damaged(self, path: str, problem: str, live: int) -> None:
        aside = set_aside_damaged(self.destination, path, problem, live, self.live_db)
        self.log(
            f"{path}: {problem}. It is kept as {os.path.basename(aside)} (delete it once you no longer need it) "
            "and a new replica is built from the live database",
            "warn",
        )

    def _new_replica(self, snapshot: bool) -> None:
        """A new replica (state.build_replica), then drop the older ones."""
        dirs = replica_dirs(self.destination)
        final, version = build_replica(self.destination, self.live_db, self.filter_tables, snapshot)
        if self.conn is not None:
            self.conn.close()
        self.conn = connect(os.path.join(final, REPLICA_FILE))
        self.generation = final
        self.last, self.last_is_journaled = version, False
        self._pending_fk = None
        self.counters.generations_started += 1
        self._place.remember(self.destination, os.path.join(final, REPLICA_FILE))
        for _, old in dirs:  # the new replica is complete and synced: the old ones can go
            try:
                doomed = old + DELETED_SUFFIX
                os.rename(old, doomed)
                fsync_dir(self.destination)
                shutil.rmtree(doomed)
            except OSError as e:  # the new one is complete: a leftover costs space, not safety
                self.log(f"could not delete the old replica {old}: {io_error_message(e, old)}; it goes at the next start", "warn")
        what = f"a snapshot at data_version {version}" if snapshot else "an empty database (new node)"
        self.log(f"started replica {os.path.basename(final)} from {what}", "info")

    def _replay_early(self, early: Sequence[Call]) -> None:
        replay_early(early, lambda: (self.last, self.last_is_journaled), self._apply)

    # --- the hot path ----------------------------------------------------------------
    def write(self, data_version: int, writes: List[str]) -> None:
        with self._lock:
            gate(self.failure)
            try:
                self._write(data_version, writes)
            except OSError as e:
                raise DestinationError(io_error_message(e, self.generation or self.destination)) from e
            except sqlite3.Error as e:
                raise ReplicaError(sqlite_message(self.generation, e)) from e

    def _write(self, data_version: int, writes: List[str]) -> None:
        pragma = is_pragma_only(writes)
        a = classify(self.last, data_version, pragma, self.last_is_journaled)
        if a is Action.GAP:
            self.log(
                f"gap: replica ends at data_version {self.last}, lightningd sent {data_version}; "
                "taking a snapshot of the live database",
                "warn",
            )
            a = self._rebase(data_version, pragma, "still does not follow")
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
            self._apply(self._rebase(data_version, pragma, "does not follow"), data_version, writes)

    def _rebase(self, data_version: int, pragma: bool, how: str) -> Action:
        """A new replica from a snapshot of the live database, which this call must then follow."""
        self._new_replica(snapshot=True)
        a = classify(self.last, data_version, pragma, False)
        if a is not Action.APPEND and a is not Action.PRAGMA:
            raise BehindError(
                f"after a new snapshot at data_version {self.last} lightningd's call {data_version} {how}; restart lightningd"
            )
        return a

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
                apply_pending(c, self.generation)
                c.execute(
                    f"UPDATE {STATE_TABLE} SET applied = ?, pending_version = NULL, pending = NULL, pending_fk = NULL WHERE id = 1",
                    (data_version,),
                )
                c.execute("COMMIT")
            except BaseException:
                rollback(c)
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
                    apply_pending(c, self.generation)
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
                rollback(c)
                raise
            self.last, self.last_is_journaled = data_version, True
            self._pending_fk = bool(fk)
            if cl.critical:
                self.counters.critical_frames += 1
            else:
                self.counters.bulk_frames += 1
        self._place.check()  # before the answer: a commit into a detached file is no backup
        self.counters.frames += 1
        self.counters.syncs += 1
        self.last_flush = time.time()

    @staticmethod
    def _set_fk(c: sqlite3.Connection, on: bool) -> None:
        if bool(c.execute("PRAGMA foreign_keys").fetchone()[0]) != on:
            c.execute(f"PRAGMA foreign_keys = {'ON' if on else 'OFF'}")

    # --- the rest of the Writer protocol ----------------------------------------------------
    def flush(self) -> None:
        """Every call is already durable."""

    def close(self) -> None:
        """At the end: if the live DB holds the pending transaction's data_version, it was
        committed: apply it (the replica's commit mark)."""
        with self._lock:
            c = self.conn
            try:
                if c is not None and self.failure is None and self.last_is_journaled:
                    if committed_at_end(self.live_db, self.last):
                        self._set_fk(c, self._pending_fk is not False)
                        c.execute("BEGIN IMMEDIATE")
                        try:
                            apply_pending(c, self.generation)
                            c.execute(
                                f"UPDATE {STATE_TABLE} SET applied = ?, pending_version = NULL, pending = NULL, "
                                "pending_fk = NULL WHERE id = 1",
                                (self.last,),
                            )
                            c.execute("COMMIT")
                            self.last_is_journaled = False
                        except (sqlite3.Error, PibackupError) as e:
                            rollback(c)
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

    def open_segment(self) -> Optional[Tuple[str, int]]:
        return None  # SQLite rewrites pages in place: nothing grows that a copy could follow

    def warnings(self) -> List[str]:
        return []  # a replica has no segments to roll over, and damage is set aside at once

    def compact(self) -> CompactAnswer:
        return CompactAnswer("refused", "pibackup-mode=replica: a replica never grows past the database")

    def status(self) -> Dict[str, Any]:
        free = free_bytes(self.destination)
        with self._lock:
            out = base_status(
                self.destination,
                self.live_db,
                free,
                self.generation_count(),
                self.generation,
                self.last,
                self.last_flush,
                self.filter_tables,
                self.counters,
            )
            out.update(
                replica=os.path.join(self.generation or "", REPLICA_FILE),
                pending_bulk_bytes=0,
                compaction="not used in replica mode",
            )
            return out
