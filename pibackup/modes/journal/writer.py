"""The journal writer behind the db_write hook: sequence rules applied to one destination.

Plain Python, no pyln: plugin.py calls start() at init and write() for every hook call.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

from pibackup import __version__
from pibackup.errors import PibackupError
from pibackup.modes.api import BehindError, Call, CompactAnswer, Counters, Log
from pibackup.modes.journal.port import CompactionError, CompactionHooks, Cut, Finished, PortState, Superseded, Switched
from pibackup.rules import filter as flt
from pibackup.rules.replayguard import check_call
from pibackup.rules.sequence import Action, classify, is_pragma_only, reconcile
from pibackup.store import directory as dst
from pibackup.store.appender import SegmentSettings, create_segment, first_header, next_header
from pibackup.store.chain import DamageError, Tail, generation_info, generation_settings, read_tail
from pibackup.store.fsio import io_error_message
from pibackup.store.journal import (
    HEADER_SIZE,
    KIND_INFO,
    KIND_PRAGMA,
    KIND_TX,
    SegmentHeader,
    SegmentLeftBehind,
    SegmentWriter,
    decode_header,
    trim_zeros,
)
from pibackup.store.snapshot import live_data_version, take_snapshot
from pibackup.testpoints import crash_point


@dataclass
class _Tail:
    """Where the newest generation stands, as far as the writer is concerned."""

    generation: dst.Generation
    last: Optional[int]  # data_version of its newest transaction (base version without one)
    last_unconfirmed: bool  # that transaction was answered, but nothing shows lightningd committed it
    tail: Optional[Tail]  # None when the generation could not be read
    damage: Optional[str]  # set when it must not be continued


class Backup:
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
        self._dest_id: Optional[tuple] = None  # (st_dev, st_ino) of the destination at start
        # Compaction (compact.py): the current generation's sizes decide when; keep 0 = off.
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
        dst.validate(self.destination)
        if any(n.startswith("replica-") for n in os.listdir(self.destination)):
            raise dst.DestinationError(
                f"{self.destination} holds a replica-mode backup (replica-NNNNNN directories); pibackup-mode=journal "
                "needs a directory of its own: give an empty pibackup-destination, or set pibackup-mode=replica"
            )
        try:
            self.dest.prepare()
            st = os.stat(self.destination)
            self._dest_id = (st.st_dev, st.st_ino)
            with self._lock:
                self._start(early)
                self._flush(other=True)
        except OSError as e:
            raise dst.DestinationError(io_error_message(e, self.destination)) from e
        if self.batch_seconds > 0:
            self._flusher = threading.Thread(target=self._flush_loop, name="pibackup-flusher", daemon=True)
            self._flusher.start()
        if self.compactor is not None:
            self.compactor.start()

    def _start(self, early: Sequence[Call]) -> None:
        live = live_data_version(self.live_db)
        tail = self._read_tail()
        calls = [(c.data_version, is_pragma_only(c.writes)) for c in early]
        if tail is None:
            fresh = bool(early) and early[0].data_version == 1 and not calls[0][1]
            if fresh and reconcile(0, False, calls, live) is Action.APPEND:
                # A brand-new node: the early calls hold its whole history from the schema on.
                self._new_generation(snapshot=False)
                self._replay_early(early)
                return
            self._new_generation(snapshot=True)
            self._replay_early(early)
            return
        action = reconcile(tail.last, tail.last_unconfirmed, calls, live)
        if action is Action.BEHIND:
            assert tail.last is not None
            raise BehindError(self._behind_message(tail.last, live, tail.generation.name))
        if tail.damage is not None:
            self.log(
                f"newest backup generation {tail.generation.name} is damaged ({tail.damage}); it is kept as it is "
                "and a new generation is started from a snapshot of the live database",
                "warn",
            )
            action = Action.GAP
        elif action is not Action.GAP and self._filter_changed(tail.generation):
            action = Action.GAP
        elif action is Action.GAP:
            self.log(
                f"the backup ends at data_version {tail.last} and cannot be continued (live database at {live}: "
                "lightningd committed transactions without pibackup, or the plugin died before it could confirm "
                "them): starting a new generation from a snapshot",
                "warn",
            )
        if action is Action.GAP:
            self._new_generation(snapshot=True)
        else:
            self._continue(tail)
        self._replay_early(early)

    def _filter_changed(self, gen: dst.Generation) -> bool:
        """A generation holds one filter's frames: with another pibackup-filter-tables it is
        not continued (a restore would mix filtered and unfiltered rows of those tables)."""
        was = generation_settings(gen).get("filter-tables")
        now = ",".join(sorted(self.filter_tables))
        if was is None or was == now:
            return False
        self.log(
            f"pibackup-filter-tables changed ({gen.name} filters {was or 'nothing'}, now {now or 'nothing'}): "
            "starting a new generation from a snapshot, so that one generation never mixes the two",
            "warn",
        )
        return True

    def _behind_message(self, backup_version: int, live: int, gen: str) -> str:
        return (
            f"lightningd's database {self.live_db} (data_version {live}) is OLDER than the backup in "
            f"{self.destination} ({gen}, data_version {backup_version}). Running on it could lose funds. "
            f"Stop lightningd and restore the newer state: pibackup restore {self.destination} {self.live_db} --force "
            "(after moving the old file away). If this is a different node, give it an empty pibackup-destination. "
            "The backup was left untouched"
        )

    def _replay_early(self, early: Sequence[Call]) -> None:
        for c in early:
            pragma = is_pragma_only(c.writes)
            a = classify(self.last, c.data_version, pragma, self.last_is_journaled)
            if a in (Action.GAP, Action.BEHIND):
                # Already in the snapshot we just took: a snapshot is at the live version.
                continue
            self._apply(a, c.data_version, c.writes)

    def _read_tail(self) -> Optional[_Tail]:
        gen = self.dest.newest()
        if gen is None:
            return None
        try:
            t = read_tail(gen)
        except DamageError as e:
            # Still compare the live DB with what the generation claims to hold, so an old
            # live DB is never snapshotted over a newer (if damaged) backup.
            try:
                base = generation_info(gen).base_version
            except DamageError:
                base = None
            return _Tail(gen, base, False, None, str(e))
        damage = None
        if t.bad_offset is not None and not t.torn:
            damage = f"{t.path} is damaged at offset {t.bad_offset} ({t.bad_reason})"
        mark = dst.damage_mark(gen.path)
        if damage is None and mark is not None:
            damage = f"a compaction found it damaged: {mark}"
        if t.last_frame is None:
            return _Tail(gen, t.header.base_version, False, t, damage)
        # The last frame decides: a PRAGMA frame (a commit mark when empty) repeats the
        # current version and proves the transaction before it was committed.
        f = t.last_frame
        return _Tail(gen, f.data_version, f.kind == KIND_TX, t, damage)

    def _continue(self, tail: _Tail) -> None:
        """Go on in the newest generation, in a new segment: a segment's deflate stream
        cannot be resumed by another process, and written bytes are never touched."""
        t = tail.tail
        assert t is not None
        self.generation = tail.generation.path
        self.last, self.last_is_journaled = tail.last, tail.last_unconfirmed
        self.journal_bytes = _journal_bytes(tail.generation.segments, t.valid_length)
        self.base_version = t.header.base_version
        self.snapshot_bytes = _size(tail.generation.snapshot) if tail.generation.snapshot else 0
        if t.bad_offset is not None:
            # A torn tail from a crash mid-append: it was never acknowledged. The new
            # segment's header records where the valid part ended.
            self.log(
                f"{t.path}: unfinished append after offset {t.valid_length} (a write cut short by a crash); "
                "continuing in a new segment",
                "info",
            )
        self._open_segment(t.header, t.header.segment + 1, t.valid_length, t.final_checksum)

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
            snapshot_bytes = _size(snap) if snapshot else 0
            writer = create_segment(partial, header, self.segment_settings.chunk_for(snapshot_bytes))
            writer.append(KIND_INFO, version, self.info_lines())
            final = self.dest.commit_generation(partial)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        writer.path = os.path.join(final, dst.segment_filename(1))
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
            if self.failure is not None:
                raise dst.DestinationError(self.failure)
            self._write(data_version, writes)

    def _write(self, data_version: int, writes: List[str]) -> None:
        check_call(data_version, writes, is_pragma_only(writes))
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
            raise dst.DestinationError(io_error_message(e, self.generation or self.destination)) from e

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
            self._check_destination_in_place()
            self.last_flush = time.time()
            self.journal_bytes += n
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
                nxt = os.path.join(self.generation, dst.segment_filename(w.header.segment + 1))
                if isinstance(e, SegmentLeftBehind) or os.path.lexists(nxt):
                    self.failure = io_error_message(e, self.generation)  # nothing more reaches this writer's files
                    raise
                if not self.roll_failed:
                    where = io_error_message(e, self.generation or self.destination)
                    self.log(f"could not start the next journal segment ({where}); going on in {w.path}", "warn")
                self.roll_failed = True

    roll_failed = False  # the last roll-over could not start the next segment (a warning in status)
    damaged: Optional[str] = None  # why the writer's generation cannot be restored whole (a warning in status)

    def mark_damaged(self, generation: str, why: str) -> None:
        """A compaction found `generation` damaged: a restore of it would stop at the damage,
        short of calls already answered. If the writer is still in it, the next call starts a
        new generation from a snapshot of the live database (the hook's path, as after a gap:
        only then is the live database known to hold exactly what was answered). The damaged
        generation is kept as it is, until retention deletes it."""
        name = os.path.basename(generation)
        with self._lock:
            if self.generation != generation or self.failure is not None:
                # A gap moved on meanwhile (its snapshot is of the live database) or the backup failed.
                self.log(f"backup generation {name} is damaged ({why}); the backup is no longer written to it", "warn")
                return
            self.damaged = why
            self.log(
                f"backup generation {name} is damaged ({why}): a restore of it would stop there. A new generation is "
                f"started from a snapshot of the live database at lightningd's next database write; {name} is kept as "
                "it is. Damage on a healthy medium is rare: check it (dmesg, fsck) and think of replacing it",
                "warn",
            )
        try:
            dst.write_damage_mark(generation, why)  # a restart before that write must not continue it either
        except OSError as e:
            self.log(f"could not mark {name} damaged on the medium: {e}", "warn")

    def _check_destination_in_place(self) -> None:
        """A stick unplugged (or lazily unmounted) under us: our open files live on in a
        detached file system, writes and syncs succeed, and nobody will ever see them. The
        path must still lead to the directory we started in. One stat per flush.

        st_dev: our open files keep the old file system alive, and no two live ones share
        a device number, so another stick at the path always differs. st_ino is sound even
        where the file system invents inode numbers (FAT, exFAT, FUSE), which change only
        when the kernel forgets the inode: the lock directory held open in it pins this
        directory (tests/e2e/test_filesystems.py drops the caches under a replay on exFAT)."""
        if self._dest_id is None:
            return
        try:
            st = os.stat(self.destination)
        except FileNotFoundError as e:
            raise FileNotFoundError(errno.ENOENT, "the backup directory vanished", self.destination) from e
        if (st.st_dev, st.st_ino) != self._dest_id:
            raise OSError(errno.ESTALE, "the backup directory was replaced (stick unplugged?)", self.destination)

    def flush(self) -> None:
        """Make everything answered so far durable (at shutdown, and before exit)."""
        with self._lock:
            if self.failure is None:
                try:
                    self._flush(other=True)
                except OSError as e:
                    self.failure = io_error_message(e, self.generation or self.destination)
                    raise dst.DestinationError(self.failure) from e

    def _mark_committed(self) -> None:
        """At the end (lightningd closed our stdin): if the live DB holds our last transaction's
        data_version, write an empty PRAGMA frame, a commit mark, so the next start can go on
        in this generation. Without it the next start cannot tell our last transaction from
        one lightningd may have committed in its place, and starts a new generation."""
        with self._lock:
            if self.failure is not None or not self.last_is_journaled or self.writer is None:
                return
            try:
                live = live_data_version(self.live_db, timeout=1.0)
            except PibackupError:
                return
            if live != self.last:
                return
            try:
                self.writer.append(KIND_PRAGMA, live, [])
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

    def open_segment(self) -> Optional[tuple]:
        """(path, bytes of valid content) of the segment being appended to, for shipping."""
        with self._lock:
            w = self.writer
            return None if w is None else (w.path, w.size)

    # --- compaction (the compactor thread calls these; each takes the lock briefly) ---------
    def cut(self) -> Optional[Cut]:
        """Make everything answered so far durable and note where the journal ends: segments
        before the writer's and the first `length` bytes of its segment never change again
        (appends only), so the child can replay them while the hook goes on. The writer
        restarts its deflate stream there, so the frames after the cut can be read without
        the ones before. No file is created or closed: a call waiting meanwhile pays one
        sync at most. None when there is nothing to compact."""
        with self._lock:
            w = self.writer
            if self.failure is not None or w is None or self.generation is None:
                return None
            try:
                self._flush(other=True)
            except OSError as e:
                self.failure = io_error_message(e, self.generation or self.destination)
                self.log(f"pibackup: {self.failure}. lightningd will be halted at its next database write.", "error")
                return None
            w = self.writer
            assert w is not None
            committed = self.last if not self.last_is_journaled else (self.last or 0) - 1
            if self.last is None or committed == self.base_version:
                return None  # nothing committed since the snapshot: nothing to compact, nothing to delete
            gen = next((g for g in self.dest.generations() if g.path == self.generation), None)
            if gen is None:
                return None
            self._reserved = max(self.dest.next_generation_number(), gen.number + 1)
            self._cut_journal_bytes = self.journal_bytes
            w.restart_stream()
            return Cut(gen, w.header.segment, w.size, w.checksum, self._reserved, self.journal_bytes)

    def trim_closed(self) -> None:
        """Give back the preallocated zeros of segments closed by a compaction's
        switch (the compactor's thread, not the hook's). Best effort: a file that is gone
        (retention) or cannot be trimmed keeps its zeros, which are valid. Nothing after a
        failure: then nothing more reaches the medium."""
        with self._lock:
            todo, self.untrimmed = self.untrimmed, []
            if self.failure is not None:
                return
        for path, length in todo:
            try:
                trim_zeros(path, length)
            except OSError:
                pass

    def release(self) -> None:
        with self._lock:
            self._reserved = None

    def sizes(self) -> Tuple[int, int]:
        with self._lock:
            return self.journal_bytes, self.snapshot_bytes

    def state(self) -> PortState:
        with self._lock:
            return PortState(self.failure, self.damaged, self.generation, self.generation_number())

    def position(self, generation: int) -> Optional[Tuple[int, int]]:
        """(segment number, durable bytes) of the segment being written, if the writer is
        still in `generation` (None after a gap started another)."""
        with self._lock:
            return self._position(generation)

    def _position(self, generation: int) -> Optional[Tuple[int, int]]:
        w = self.writer
        if w is None or self.failure is not None or self.generation is None:
            return None
        if os.path.basename(self.generation) != dst.generation_dirname(generation):
            return None
        return w.header.segment, w.size

    def switch(self, source: int, finish: Callable[[int, int, int], Finished]) -> Switched:
        """The atomic switch, under the lock (the hook waits for it): the old generation's
        waiting frames are made durable, `finish` copies the last frames and syncs them, the
        `.partial` is renamed, and the writer goes on in the new generation's open segment."""
        with self._lock:
            src = self.generation
            position = self._position(source)
            if position is None:
                raise Superseded("a new generation was started meanwhile (a gap); this compaction is dropped")
            try:
                self._flush(other=True)
            except OSError as e:
                self.failure = io_error_message(e, self.generation or self.destination)
                self.log(f"pibackup: {self.failure}. lightningd will be halted at its next database write.", "error")
                raise CompactionError(self.failure) from e
            w = self.writer
            assert w is not None
            done = finish(w.header.segment, w.size, w.checksum)
            crash_point("switch-synced")
            # Every file in the .partial was created with a directory sync (segments, the
            # snapshot's rename); only a segment begun just now could need another.
            try:
                final = self.dest.commit_generation(done.partial, dir_synced=done.dir_synced)
            except OSError as e:
                if os.path.lexists(done.partial[: -len(".partial")]):
                    # Renamed but not synced: the new generation may be what a restore reads,
                    # so going on in the old one could put answered calls where none looks.
                    self.failure = io_error_message(e, done.partial)
                    self.log(f"pibackup: {self.failure}. lightningd will be halted at its next database write.", "error")
                raise
            crash_point("switch-renamed")
            new = done.writer
            new.path = os.path.join(final, os.path.basename(new.path))
            self.writer = new
            if w.allocated > w.size:
                self.untrimmed.append((w.path, w.size))
            try:
                w.close(trim=False)  # its zeros go later, outside the lock (trim_closed)
            except OSError:
                pass
            self.generation = final
            grown = max(0, self.journal_bytes - self._cut_journal_bytes)
            self.journal_bytes = done.closed_bytes + new.size
            self.snapshot_bytes = _size(os.path.join(final, dst.snapshot_filename(done.version)))
            self.base_version = done.version
            self.counters.generations_started += 1
            self.counters.compactions += 1
            self._reserved = None
            self.log(f"switched from {os.path.basename(src or '')} to {os.path.basename(final)}", "debug")
            return Switched(final, grown)

    def warnings(self) -> List[str]:
        """What status, systemd and the LED warn of for this destination (the fan-out adds its own)."""
        out: List[str] = []
        if self.roll_failed:
            out.append(
                f"cannot start a new journal segment in {self.destination}: the current one grows past "
                "pibackup-segment-size until it can (see the log for the cause)"
            )
        damaged = self.damaged
        if damaged:
            out.append(
                f"the backup in {self.destination} is damaged ({damaged}); a new generation is started from a snapshot of "
                "the live database at lightningd's next database write"
            )
        return out

    def compact(self) -> CompactAnswer:
        """`lightning-cli pibackup-compact` for this destination: start a compaction in the background."""
        if self.compactor is None:
            return CompactAnswer("refused", "automatic compaction and retention are off for this destination")
        damaged = self.damaged
        outcome = self.compactor.request()
        if outcome == "started":
            return CompactAnswer("started")
        if outcome == "already running":
            return CompactAnswer("already running")
        damaged = self.damaged or damaged
        reason = ""
        if damaged:
            reason = f"the current generation is damaged ({damaged}); lightningd's next write replaces it from the live DB"
        return CompactAnswer("refused", reason)

    def generation_number(self) -> Optional[int]:
        g = self.generation
        return int(os.path.basename(g)[4:]) if g else None

    def generation_count(self) -> int:
        try:
            return len(self.dest.generations())
        except OSError:
            return 0

    def status(self) -> Dict[str, Any]:
        try:
            st = os.statvfs(self.destination)
            free: Optional[int] = st.f_bavail * st.f_frsize
        except OSError:
            free = None
        # Outside the lock: the compactor's status asks the writer for its sizes.
        compaction: Any = self.compactor.status() if self.compactor is not None else "off"
        with self._lock:
            w = self.writer
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
                "data_version": self.last,
                "filter_tables": sorted(self.filter_tables),
                "pending_bulk_bytes": w.pending_bytes if w else 0,
                "counters": asdict(self.counters),
                "compaction": compaction,
            }

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


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _journal_bytes(segments: Sequence[str], last_valid: int) -> int:
    """Valid bytes of a generation's journal (preallocated zeros left out): each segment's
    header records the valid length of the one before it."""
    total = last_valid
    for path in segments[1:]:
        try:
            with open(path, "rb") as f:
                total += decode_header(f.read(HEADER_SIZE), path).prev_valid_length
        except (OSError, PibackupError):
            total += _size(path)
    return total
