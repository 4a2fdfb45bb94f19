"""The journal writer behind the db_write hook: sequence rules applied to one destination.

Plain Python, no pyln: plugin.py calls start() at init and write() for every hook call.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from typing import FrozenSet, List, Optional, Sequence, Tuple

from pibackup import __version__
from pibackup.modes.api import BehindError, Call, Counters, Log
from pibackup.modes.common import PlaceGuard, committed_at_end, gate
from pibackup.modes.journal.port import CompactionHooks, JournalPort
from pibackup.modes.journal.report import Report
from pibackup.modes.journal.startup import Startup
from pibackup.rules import filter as flt
from pibackup.rules.sequence import Action, classify, is_pragma_only
from pibackup.store import directory as dst
from pibackup.store.access import DestinationError, validate
from pibackup.store.appender import SegmentSettings, create_segment, first_header, next_header
from pibackup.store.fsio import io_error_message
from pibackup.store.identity import refuse_other_node
from pibackup.store.layout import REPLICA_PREFIX, segment_filename
from pibackup.store.segment import KIND_INFO, KIND_PRAGMA, KIND_TX, SegmentHeader
from pibackup.store.snapfile import database_bytes
from pibackup.store.snapshot import take_snapshot
from pibackup.store.writer import SegmentLeftBehind, SegmentWriter


# size: the hot path, its flushes, the segment and generation changes they trigger and the
# lifecycle share one lock and one set of fields; start-up, the compaction port and reporting
# are split off already (startup.py, port.py, report.py).
class JournalWriter(Startup, JournalPort, Report):
    """One destination's journal writer.

    Tiers: a critical transaction is durable before write() returns. A bulk one (chain
    bookkeeping, see filter.py) may wait in memory up to batch_seconds / batch_bytes; it is
    written, in order, with the next critical frame or by the flusher thread. So what is
    durable is always a prefix of the transaction stream holding every critical one.
    """

    def __init__(
        self,
        destination: str,
        live_db: str,
        log: Log,
        *,
        segment_bytes: int,
        filter_tables: FrozenSet[str],
        batch_seconds: float,
        batch_bytes: int,
        preallocate: int,
        compress: bool = True,
        compaction: Optional[CompactionHooks] = None,
    ):
        # Defaults live in config.py only; hook.py passes every value it parsed.
        self.destination = destination
        self.live_db = live_db
        self.log = log
        self.segment_bytes = segment_bytes
        self.filter_tables = frozenset(filter_tables)
        self.batch_seconds = batch_seconds
        self.batch_bytes = batch_bytes
        self.segment_settings = SegmentSettings.of(compress, preallocate)
        self.preallocate = preallocate
        self.dest = dst.Destination(destination)
        self.writer: Optional[SegmentWriter] = None
        self.generation: Optional[str] = None
        self.last: Optional[int] = None
        self.last_is_journaled = False
        self.counters = Counters()
        self.failure: Optional[str] = None  # set by the flusher thread; every later write refuses
        self._lock = threading.Lock()
        self._pending_since: Optional[float] = None
        self.last_flush: Optional[float] = None  # time.time() of the last durable write
        self._stop = threading.Event()
        self._flusher: Optional[threading.Thread] = None
        self._place = PlaceGuard(destination)  # the destination as it was at start
        # Compaction (compaction/): the current generation's sizes decide when; keep 0 = off.
        self.journal_bytes = 0
        self.snapshot_bytes = 0
        self._reserved: Optional[int] = None  # generation number a compaction is building
        self.untrimmed: List[Tuple[str, int]] = []  # (closed segment, valid length): zeros to give back
        self.base_version: Optional[int] = None  # of the current generation
        self._cut_journal_bytes = 0
        # compaction/wiring.py make_journal_writer() passes the compactor in; the writer never
        # imports compaction.
        self.compactor: Optional[CompactionHooks] = compaction

    # --- start-up --------------------------------------------------------------
    def start(self, early: Sequence[Call]) -> None:
        """Open the destination and bring it in step with the live DB and the early calls."""
        validate(self.destination)
        if any(n.startswith(REPLICA_PREFIX) for n in os.listdir(self.destination)):
            raise DestinationError(
                f"{self.destination} holds a replica-mode backup (replica-NNNNNN directories); pibackup-mode=journal "
                "needs a directory of its own: give an empty pibackup-destination, or set pibackup-mode=replica"
            )
        refuse_other_node(self.destination, self.live_db)  # before the marker, lock or anything is written
        try:
            self.dest.prepare()
            self._place.remember(self.destination)
            with self._lock:
                self._start(early)
                self._flush(other=True)
        except OSError as e:
            raise DestinationError(io_error_message(e, self.destination)) from e
        if self.batch_seconds > 0:
            self._flusher = threading.Thread(target=self._flush_loop, name="pibackup-flusher", daemon=True)
            self._flusher.start()
        if self.compactor is not None:
            self.compactor.start()

    # --- generations and segments ---------------------------------------------------
    def _new_generation(self, snapshot: bool) -> None:
        if self.writer is not None:
            self._flush(other=True)  # what was answered before the gap stays in the old generation
        number = self.dest.next_generation_number()
        if self._reserved is not None:
            number = max(number, self._reserved + 1)  # a compaction is building that one: it will notice and give up
        partial = self.dest.begin_generation(number)
        try:
            if snapshot:
                snap, version, sha = take_snapshot(self.live_db, partial, strip=self.filter_tables)
            else:
                snap, version, sha = "", 0, b"\0" * 32
            header = first_header(number, version, sha, self.segment_settings.flags)
            snapshot_bytes = database_bytes(snap) if snapshot else 0
            writer = create_segment(partial, header, self.segment_settings.chunk_for(snapshot_bytes))
            writer.append(KIND_INFO, version, self.info_lines())
            final = self.dest.commit_generation(partial)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        writer.path = os.path.join(final, segment_filename(1))
        if self.writer is not None:
            self.writer.close()
        self.writer = writer
        self.generation = final
        self.damaged = None
        self.last, self.last_is_journaled = version, False
        self.base_version = version
        self.counters.generations_started += 1
        self.journal_bytes = writer.size
        self.snapshot_bytes = snapshot_bytes
        if self.compactor is not None:
            self.compactor.new_generation()
        what = f"snapshot at data_version {version}" if snapshot else "an empty database (new node)"
        self.log(f"started backup generation {os.path.basename(final)} from {what}", "info")

    def info_lines(self) -> List[str]:
        return [f"pibackup={__version__}", "filter-tables=" + ",".join(sorted(self.filter_tables))]

    def _open_segment(
        self, like: SegmentHeader, number: int, prev_length: int, prev_checksum: int, trim_now: bool = True
    ) -> None:
        """Start segment `number` and close the one being written. Its preallocated zeros are
        given back now (a roll-over: one more sync, once per segment), or with `trim_now`
        False by the compactor's thread later, outside the lock (trim_closed)."""
        assert self.generation is not None
        header = next_header(like, number, prev_length, prev_checksum, self.segment_settings.flags)
        writer = create_segment(self.generation, header, self.segment_settings.chunk_for(self.snapshot_bytes))
        old, self.writer = self.writer, writer
        self.roll_failed = False
        if old is not None:
            if not trim_now and old.allocated > old.size:
                self.untrimmed.append((old.path, old.size))
            try:
                old.close(trim=trim_now)
            except OSError:
                pass  # its frames were synced; the file is done with

    # --- the hot path -------------------------------------------------------------------
    def write(self, data_version: int, writes: List[str]) -> None:
        """Journal one db_write call (durably if it is critical), or raise. For every call after init."""
        with self._lock:
            gate(self.failure)
            self._write(data_version, writes)

    def _write(self, data_version: int, writes: List[str]) -> None:
        a = classify(self.last, data_version, is_pragma_only(writes), self.last_is_journaled)
        try:
            if a is Action.GAP or (self.damaged is not None and a is not Action.BEHIND):
                if a is Action.GAP:
                    self.log(
                        f"gap: backup ends at data_version {self.last}, lightningd sent {data_version}; "
                        "taking a snapshot of the live database",
                        "warn",
                    )
                else:
                    name = os.path.basename(self.generation or "")
                    self.log(f"replacing the damaged {name}: taking a snapshot of the live database", "warn")
                self._new_generation(snapshot=True)
                a = classify(self.last, data_version, is_pragma_only(writes), False)
                if a is not Action.APPEND and a is not Action.PRAGMA:
                    raise BehindError(
                        f"after a new snapshot at data_version {self.last} lightningd's call {data_version} still "
                        "does not follow; restart lightningd"
                    )
            if a is Action.BEHIND:
                assert self.last is not None
                raise BehindError(self._behind_message(self.last, data_version, os.path.basename(self.generation or "")))
            self._apply(a, data_version, writes)
        except OSError as e:
            raise DestinationError(io_error_message(e, self.generation or self.destination)) from e

    def _apply(self, a: Action, data_version: int, writes: List[str]) -> None:
        w = self.writer
        assert w is not None
        if a is Action.PRAGMA:
            kind, kept, critical = KIND_PRAGMA, writes, True
        else:
            c = flt.classify(writes, self.filter_tables)
            kind, kept, critical = KIND_TX, c.writes, c.critical
            self.counters.statements_dropped += c.dropped
        w.add(kind, data_version, kept)
        cnt = self.counters
        cnt.frames += 1
        if critical:
            cnt.critical_frames += 1
        else:
            cnt.bulk_frames += 1
        if a is Action.REWIND:
            cnt.rewinds += 1
            self.log(f"data_version {data_version} sent again: the earlier one was never committed; replaced", "info")
        if kind == KIND_TX:
            self.last, self.last_is_journaled = data_version, True
        else:
            self.last_is_journaled = False
        if critical or a is Action.REWIND or self.batch_seconds <= 0:
            # A rewind is always synced: the frame it replaces was synced, and until the
            # replacement is too, the durable journal would end in a transaction
            # lightningd never committed.
            self._flush()
        elif w.pending_bytes >= self.batch_bytes:
            self._flush(bulk=True)
        elif self._pending_since is None:
            self._pending_since = time.monotonic()

    def _flush(self, bulk: bool = False, other: bool = False) -> None:
        """Write and sync everything pending (caller holds the lock); roll the segment over when full."""
        w = self.writer
        if w is None:
            return
        n = w.flush()
        self._pending_since = None
        if n:
            self._place.check()
            self.last_flush = time.time()
            self.journal_bytes += n
            if w.preallocate:  # bigger chunks as the generation grows: fewer extensions (appender.py)
                w.preallocate = max(w.preallocate, self.segment_settings.chunk_for(self.snapshot_bytes + self.journal_bytes))
            if self.compactor is not None:
                self.compactor.flushed(self.journal_bytes, self.snapshot_bytes)
            self.counters.bytes_written += n
            self.counters.write_calls += 1
            self.counters.syncs += 1
            self.counters.bulk_syncs += bulk
            self.counters.other_syncs += other
        if w.size >= self.segment_bytes:
            try:
                self._open_segment(w.header, w.header.segment + 1, w.size, w.checksum)
            except OSError as e:
                # What was just flushed is durable: the call it answers is not refused for
                # this. The segment goes on past its size and the roll-over is tried again at
                # the next flush; a medium that takes no new file fails that write instead.
                # Unless the new segment could not be removed again: it would claim to
                # continue a segment that keeps growing, so that is a failure.
                assert self.generation is not None
                nxt = os.path.join(self.generation, segment_filename(w.header.segment + 1))
                if isinstance(e, SegmentLeftBehind) or os.path.lexists(nxt):
                    self.failure = io_error_message(e, self.generation)  # nothing more reaches this writer's files
                    raise
                if not self.roll_failed:
                    where = io_error_message(e, self.generation or self.destination)
                    self.log(f"could not start the next journal segment ({where}); going on in {w.path}", "warn")
                self.roll_failed = True

    roll_failed = False  # the last roll-over could not start the next segment (a warning in status)
    damaged: Optional[str] = None  # why the writer's generation cannot be restored whole (a warning in status)

    def flush(self) -> None:
        """Make everything answered so far durable (at shutdown, and before exit)."""
        with self._lock:
            if self.failure is None:
                try:
                    self._flush(other=True)
                except OSError as e:
                    self.failure = io_error_message(e, self.generation or self.destination)
                    raise DestinationError(self.failure) from e

    def _mark_committed(self) -> None:
        """At the end (lightningd closed our stdin): if the live DB holds our last transaction's
        data_version, write an empty PRAGMA frame, a commit mark, so the next start can go on
        in this generation. Without it the next start cannot tell our last transaction from
        one lightningd may have committed in its place, and starts a new generation."""
        with self._lock:
            if self.failure is not None or not self.last_is_journaled or self.writer is None:
                return
            if self.last is None or not committed_at_end(self.live_db, self.last):
                return
            try:
                self.writer.append(KIND_PRAGMA, self.last, [])
                self.last_is_journaled = False
            except OSError as e:
                self.log(f"could not mark the last transaction committed: {e}", "warn")

    def _flush_loop(self) -> None:
        tick = min(1.0, max(0.05, self.batch_seconds / 4))
        while not self._stop.wait(tick):
            with self._lock:
                since = self._pending_since
                if self.failure is not None or since is None or time.monotonic() - since < self.batch_seconds:
                    continue
                try:
                    self._flush(bulk=True)
                except OSError as e:
                    self.failure = io_error_message(e, self.generation or self.destination)
                    self.log(f"pibackup: {self.failure}. lightningd will be halted at its next database write.", "error")

    def close(self) -> None:
        """Flush what is pending, mark the last transaction committed if the live DB says it
        is, stop the flusher and the compactor, release the destination."""
        if self.compactor is not None:
            self.compactor.stop()
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join()
        try:
            self.flush()
            self._mark_committed()
        finally:
            with self._lock:
                if self.writer is not None:
                    self.writer.close(trim=self.failure is None)  # after a failure nothing more reaches the medium
                    self.writer = None
            self.dest.close()

