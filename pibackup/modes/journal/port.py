"""The journal writer's side of compaction: what the compactor may do to the writer (the port)
and what the writer asks of the compactor (the hooks), so neither imports the other.

The writer implements CompactionPort, each method under its one lock; compaction/ implements
CompactionHooks. compaction/wiring.py builds the pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

from pibackup.errors import PibackupError
from pibackup.modes.api import Log
from pibackup.store import directory as dst
from pibackup.store.appender import SegmentSettings
from pibackup.store.journal import SegmentWriter


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
