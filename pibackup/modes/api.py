"""What the fan-out and the app see of a backup mode: the calls it gets, its counters, its log, the Writer protocol."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Literal, Optional, Protocol, Sequence, Tuple

from pibackup.errors import PibackupError

Log = Callable[[str, str], None]


class BehindError(PibackupError):
    """The live database is older than the backup."""


@dataclass
class Call:
    data_version: int
    writes: List[str]


@dataclass
class Counters:
    """Per destination, for the status RPC and the benchmarks."""

    frames: int = 0
    critical_frames: int = 0
    bulk_frames: int = 0
    statements_dropped: int = 0
    bytes_written: int = 0
    write_calls: int = 0
    syncs: int = 0  # frame flushes (write + fdatasync)
    bulk_syncs: int = 0  # of which for bulk frames alone (batch timer or size)
    other_syncs: int = 0  # of which for a compaction's cut or switch, a new generation, a start or a stop
    rewinds: int = 0
    generations_started: int = 0
    compactions: int = 0


@dataclass(frozen=True)
class CompactAnswer:
    """What a request for a compaction got: "started", "already running" or "refused" (with the reason)."""

    outcome: Literal["started", "already running", "refused"]
    reason: str = ""


class Writer(Protocol):
    """One destination's writer, whatever its mode."""

    destination: str  # path/address as configured; the fan-out's and status's key
    failure: Optional[str]  # set by its own threads or by the fan-out after a refusal; then write() raises
    last: Optional[int]  # data_version of the newest transaction held
    generation: Optional[str]  # path of the gen-/replica- directory being written
    last_flush: Optional[float]  # time.time() of the last durable write

    def start(self, early: Sequence[Call]) -> None:
        """Check and lock the directory, reconcile with the live database, replay the early calls."""

    def write(self, data_version: int, writes: List[str]) -> None:
        """Return only when as durable as its tier; raising means lightningd must not commit."""

    def flush(self) -> None: ...

    def close(self) -> None: ...

    def open_segment(self) -> Optional[Tuple[str, int]]:
        """(path, valid bytes) of a file growing in place, for copies; None if none."""

    def generation_count(self) -> int: ...

    def warnings(self) -> List[str]:
        """Roll-over failing, damaged generation."""

    def compact(self) -> CompactAnswer: ...

    def status(self) -> Dict[str, Any]: ...
