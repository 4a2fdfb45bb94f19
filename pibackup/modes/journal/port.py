"""The journal writer's side of compaction: what the compactor may do to the writer (the port)
and what the writer asks of the compactor (the hooks), so neither imports the other.

The writer implements CompactionPort, each method under its one lock; compaction/ implements
CompactionHooks. compaction/wiring.py builds the pair.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

from pibackup.errors import PibackupError
from pibackup.modes.api import Counters, Log
from pibackup.store import directory as dst
from pibackup.store.appender import SegmentSettings
from pibackup.store.fsio import io_error_message
from pibackup.store.layout import PARTIAL_SUFFIX, generation_dirname, snapshot_filename
from pibackup.store.snapfile import database_bytes
from pibackup.store.writer import SegmentWriter, trim_zeros
from pibackup.testpoints import crash_point


class CompactionError(PibackupError):
    pass


class GenerationDamaged(CompactionError):
    """The generation being compacted cannot be read whole (its snapshot or a journal frame
    is damaged): a restore of it would stop short, so the backup starts a new generation
    from the live database (CompactionPort.mark_damaged)."""


class Superseded(CompactionError):
    """A gap started a newer generation from the live DB while this compaction ran."""


@dataclass(frozen=True)
class Cut:
    """Where the durable journal ended when a compaction began; the writer restarted its
    deflate stream there, so the frames after it can be read without the ones before."""

    generation: dst.Generation  # the generation being compacted
    segment: int  # its segment being written at the cut
    length: int  # bytes of that segment that never change again
    checksum: int  # the chain value there
    number: int  # reserved for the new generation
    journal_bytes: int  # the generation's journal bytes at the cut


@dataclass(frozen=True)
class PortState:
    failure: Optional[str]  # the writer failed: nothing more reaches the medium
    damaged: Optional[str]  # its generation cannot be restored whole: the next call replaces it
    generation: Optional[str]  # path of the generation being written
    number: Optional[int]  # its number


@dataclass(frozen=True)
class Finished:
    """What the compaction hands over at the switch: its new generation, complete and synced."""

    partial: str  # the `.partial` directory, renamed by the switch
    writer: SegmentWriter  # its open segment, where the writer goes on
    closed_bytes: int  # valid bytes of its closed segments
    version: int  # data_version of its snapshot
    dir_synced: bool  # no segment was begun while finishing: no directory sync is owed


@dataclass(frozen=True)
class Switched:
    generation: str  # path of the new generation, now the writer's
    grown: int  # journal bytes the old generation took while it was compacted


class CompactionPort(Protocol):
    """What the compactor may do to the journal writer; each call takes the writer's lock."""

    destination: str
    dest: dst.Destination
    log: Log
    segment_bytes: int
    segment_settings: SegmentSettings

    def info_lines(self) -> List[str]: ...

    def cut(self) -> Optional[Cut]:
        """Make what was answered durable and note where the journal ends; None: nothing to compact."""

    def position(self, generation: int) -> Optional[Tuple[int, int]]:
        """(segment, durable bytes) of the writer, while it is still in `generation`."""

    def switch(self, source: int, finish: Callable[[int, int, int], Finished]) -> Switched:
        """Under the lock (the hook waits): `finish(segment, durable, checksum)` copies the last
        frames and syncs; the writer then renames the `.partial` and goes on in it."""

    def sizes(self) -> Tuple[int, int]:
        """(journal bytes, snapshot bytes) of the writer's generation."""

    def state(self) -> PortState: ...

    def mark_damaged(self, generation: str, why: str) -> None: ...

    def trim_closed(self) -> None: ...

    def release(self) -> None:
        """The compaction ended: the number it reserved is free again."""


class CompactionHooks(Protocol):
    """What the journal writer asks of its compactor (None: no compaction)."""

    def flushed(self, journal_bytes: int, snapshot_bytes: int) -> None:
        """After each flush that wrote bytes, under the writer's lock: cheap, calls no port method."""

    def new_generation(self) -> None:
        """A gap or a start began a new generation (retention runs in the background)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def request(self) -> str:
        """`lightning-cli pibackup-compact`: "started", "already running" or "refused"."""

    def status(self) -> Dict[str, Any]:
        """The status's "compaction" object; called without the writer's lock."""


class JournalPort:
    """The journal writer's CompactionPort (JournalWriter inherits it; its attributes are the
    writer's): every method takes the writer's one lock."""

    destination: str
    dest: dst.Destination
    log: Log
    _lock: threading.Lock
    writer: Optional[SegmentWriter]
    failure: Optional[str]
    generation: Optional[str]
    damaged: Optional[str]
    last: Optional[int]
    last_is_journaled: bool
    base_version: Optional[int]
    journal_bytes: int
    snapshot_bytes: int
    counters: Counters
    untrimmed: List[Tuple[str, int]]
    _reserved: Optional[int]
    _cut_journal_bytes: int

    def _flush(self, bulk: bool = False, other: bool = False) -> None:
        raise NotImplementedError

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
            g = self.generation
            return PortState(self.failure, self.damaged, g, int(os.path.basename(g)[4:]) if g else None)

    def position(self, generation: int) -> Optional[Tuple[int, int]]:
        """(segment number, durable bytes) of the segment being written, if the writer is
        still in `generation` (None after a gap started another)."""
        with self._lock:
            return self._position(generation)

    def _position(self, generation: int) -> Optional[Tuple[int, int]]:
        w = self.writer
        if w is None or self.failure is not None or self.generation is None:
            return None
        if os.path.basename(self.generation) != generation_dirname(generation):
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
                if os.path.lexists(done.partial[: -len(PARTIAL_SUFFIX)]):
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
            self.snapshot_bytes = database_bytes(os.path.join(final, snapshot_filename(done.version)))
            self.base_version = done.version
            self.counters.generations_started += 1
            self.counters.compactions += 1
            self._reserved = None
            self.log(f"switched from {os.path.basename(src or '')} to {os.path.basename(final)}", "debug")
            return Switched(final, grown)
