"""Replaying journal frames into a database: one SQL transaction per data_version (batched),
through the replay guard; what restore, verify and the compaction process share.

A rewound transaction is replaced, never applied next to its successor; a statement the
guard refuses is damage at the frame that holds it, like a bad checksum.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from pibackup.errors import DamageError, PibackupError
from pibackup.rules.replayguard import GuardedConnection, Refused, check_frame
from pibackup.rules.sequence import next_version
from pibackup.store.segment import KIND_INFO, KIND_PRAGMA, KIND_TX, Frame

REPLAY_BATCH = 256  # transactions per SQL transaction in restore and compaction


class RestoreError(PibackupError):
    pass


class OutputError(RestoreError):
    """The database being written cannot be written (full, read-only, I/O error): a
    problem of where it goes, not of the backup."""

    def __init__(self, message: str, full: bool):
        super().__init__(message)
        self.full = full


_OUTPUT_ERRORS = {sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN}


@dataclass
class Outcome:
    """What a read of one generation found (and, for restore, applied)."""

    generation: str
    base_version: int
    last_version: int
    transactions: int = 0
    pragmas: int = 0
    commit_marks: int = 0
    rewinds: int = 0
    frames: int = 0
    segments: int = 0
    torn_tail: Optional[str] = None  # where an unfinished last append was found, if any
    leftovers: List[str] = field(default_factory=list)  # cut-short writes in closed segments
    damage: Optional[str] = None  # set only when damage was accepted (restore --partial)
    info: Dict[str, str] = field(default_factory=dict)  # the generation's INFO frame
    rescan_from: Optional[int] = None  # lowest block height held, when utxoset was filtered

    @property
    def filtered_tables(self) -> List[str]:
        return [t for t in self.info.get("filter-tables", "").split(",") if t]


def refused_damage(e: Refused, where: str, data_version: int, offset: Optional[int]) -> DamageError:
    """A refused statement as damage at its frame ("PATH offset N")."""
    return DamageError(
        f"{where}: data_version {data_version}: {e}. The backup was changed after pibackup wrote it (tampering, "
        "or a bug); nothing from here on is replayed. `restore --partial` restores everything before it",
        where.rsplit(" offset ", 1)[0],
        offset,
    )


class Replayer:
    """Feeds frames in order; holds back the newest transaction until it is known not to be
    rewound (the next frame has another data_version, or the journal ends). Every TX and
    PRAGMA frame is checked by the replay guard's static check as it is fed (also without a
    connection: verify), and replayed under its authorizer."""

    def __init__(self, conn: Optional[GuardedConnection], base_version: int, outcome: Outcome, batch: int = 1):
        self.conn = conn
        self.current = base_version  # data_version of the state applied so far
        self.pending: Optional[Frame] = None
        self.pending_where = ""
        self.pending_pragmas: List[Tuple[Frame, str]] = []
        self.out = outcome
        # Transactions per SQL transaction. More than 1 only where nobody sees the states in
        # between (restore and compaction write a file that is thrown away on any error):
        # the same end state, with far fewer page writes (make bench: replay speed).
        self.batch = batch
        self._open = 0  # transactions in the SQL transaction now open

    def feed(self, frame: Frame, where: str) -> None:
        v = frame.data_version
        if frame.kind == KIND_INFO:
            for line in frame.statements:
                key, _, value = line.partition("=")
                self.out.info[key] = value
            return
        try:
            check_frame(frame.statements, frame.kind == KIND_PRAGMA)
        except Refused as e:
            raise refused_damage(e, where, v, frame.offset) from e
        if frame.kind == KIND_TX:
            if self.pending is not None and v == self.pending.data_version and not self.pending_pragmas:
                self.pending, self.pending_where = frame, where  # rewind: the earlier one was never committed
                self.out.rewinds += 1
                return
            expected = next_version(self.pending.data_version if self.pending else self.current)
            if v != expected:
                raise DamageError(
                    f"{where}: data_version {v} where {expected} was expected (frames out of order)",
                    where.rsplit(" offset ", 1)[0],
                    frame.offset,
                )
            self._flush()
            self.pending, self.pending_where = frame, where
        else:
            have = self.pending.data_version if self.pending else self.current
            if v != have:
                path = where.rsplit(" offset ", 1)[0]
                raise DamageError(f"{where}: PRAGMA frame at data_version {v} after {have}", path, frame.offset)
            if self.pending is None:
                self._apply_pragma(frame, where)
            else:
                self.pending_pragmas.append((frame, where))
        self.out.frames += 1

    def finish(self) -> None:
        self._flush()
        self.commit()

    def commit(self) -> None:
        """End the open SQL transaction, if any."""
        if self._open and self.conn is not None:
            self.conn.execute("COMMIT")
        self._open = 0

    def _flush(self) -> None:
        if self.pending is None:
            return
        tx = self.pending
        if self.conn is not None:
            c = self.conn
            s = "BEGIN"
            try:
                if not self._open:
                    c.execute(s)
                for s in tx.statements:
                    c.replay(s)
                self._open += 1
                if self._open >= self.batch:
                    s = "COMMIT"
                    self.commit()
            except (sqlite3.Error, Refused) as e:
                self._open = 0
                if c.in_transaction:
                    c.execute("ROLLBACK")
                if isinstance(e, Refused):
                    # Nothing of it stays: with batch 1 (restore --partial) the state is
                    # the one just before it.
                    self.pending, self.pending_pragmas = None, []
                    raise refused_damage(e, self.pending_where, tx.data_version, tx.offset) from e
                code = getattr(e, "sqlite_errorcode", 0) & 0xFF
                if code in _OUTPUT_ERRORS:
                    raise OutputError(f"cannot write the database being built: {e}", code == sqlite3.SQLITE_FULL) from e
                raise RestoreError(
                    f"replaying data_version {tx.data_version} failed: {e} (statement: {s[:160]!r}); "
                    "run `pibackup verify` on the backup"
                ) from e
        self.current = tx.data_version
        self.out.transactions += 1
        self.pending = None
        pragmas, self.pending_pragmas = self.pending_pragmas, []
        for p, where in pragmas:
            self._apply_pragma(p, where)

    def _apply_pragma(self, frame: Frame, where: str) -> None:
        if not frame.statements:
            self.out.commit_marks += 1  # written at a clean stop: nothing to apply
            return
        if self.conn is not None:
            self.commit()
            for s in frame.statements:
                try:
                    self.conn.replay(s)  # outside any transaction: PRAGMA foreign_keys is a no-op inside one
                except Refused as e:
                    raise refused_damage(e, where, frame.data_version, frame.offset) from e
        self.out.pragmas += 1
