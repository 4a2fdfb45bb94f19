"""What the journal writer tells the app: its open segment (for copies), warnings, status,
and the answer to a request for a compaction (the Writer protocol's reporting half).

A part of the writer (JournalWriter inherits it), split off for its size; it reads the
writer's fields under its lock and changes none.
"""

from __future__ import annotations

import os
import threading
from dataclasses import asdict
from typing import Any, Dict, FrozenSet, List, Optional

from pibackup.modes.api import CompactAnswer, Counters
from pibackup.modes.common import free_bytes
from pibackup.modes.journal.port import CompactionHooks
from pibackup.store import directory as dst
from pibackup.store.writer import SegmentWriter


class Report:
    """The reporting half of the journal writer (its attributes are the writer's)."""

    destination: str
    live_db: str
    dest: dst.Destination
    _lock: threading.Lock
    writer: Optional[SegmentWriter]
    generation: Optional[str]
    last: Optional[int]
    last_flush: Optional[float]
    filter_tables: FrozenSet[str]
    counters: Counters
    compactor: Optional[CompactionHooks]
    roll_failed: bool
    damaged: Optional[str]

    def open_segment(self) -> Optional[tuple]:
        """(path, bytes of valid content) of the segment being appended to, for shipping."""
        with self._lock:
            w = self.writer
            return None if w is None else (w.path, w.size)

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
        free = free_bytes(self.destination)
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
