"""Every pibackup-remote of a node, side by side: a write's bytes go to all of them first, then
its acknowledgements are awaited together, so the slowest round trip counts, not their sum.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from pibackup.modes.api import Counters, Log
from pibackup.remote.config import RemoteConfig
from pibackup.remote.mirror import OpenSegment
from pibackup.remote.sender import RemoteCopy
from pibackup.store.writer import SegmentWriter


def critical_flushes(c: Counters) -> int:
    """Flushes the hook waited for locally: not the batch timer's, not a generation's start."""
    return c.syncs - c.bulk_syncs - c.other_syncs


class RemoteCopies:
    def __init__(
        self, cfgs: Sequence[RemoteConfig], source: str, open_segment: OpenSegment, counters: Callable[[], Counters], log: Log
    ):
        self.copies = [RemoteCopy(cfg, source, open_segment, log) for cfg in cfgs]
        self.counters = counters
        self._flushes = critical_flushes(counters())

    def start(self) -> None:
        for r in self.copies:
            r.start()
        SegmentWriter.observer = self._written  # a flush's bytes go out before its local sync

    def _written(self, writer: SegmentWriter, offset: int, data: bytes) -> None:
        for r in self.copies:
            r.early(writer.path, offset, data)

    def after_write(self) -> None:
        """After the local destinations took a write: send it on, and if it was made durable
        locally as critical, return only once every remote in step acknowledged it after its
        own fsync. RemoteError (under halt) refuses the transaction."""
        flushes = critical_flushes(self.counters())
        critical, self._flushes = flushes != self._flushes, flushes
        pending: List[Tuple[RemoteCopy, Optional[int]]] = [(r, r.push(critical)) for r in self.copies]
        for r, seq in pending:
            if seq is not None:
                r.wait(seq)

    def stop(self) -> None:
        if SegmentWriter.observer == self._written:
            SegmentWriter.observer = None
        for r in self.copies:
            r.stop()

    def warnings(self) -> List[str]:
        return [w for r in self.copies for w in warnings(r)]

    def status(self) -> List[Dict[str, Any]]:
        return [status(r) for r in self.copies]


def warnings(r: RemoteCopy) -> List[str]:
    """For the log, the systemd status line, the RPC and the LED."""
    if r.problem is not None:
        since = f" since {time.strftime('%H:%M:%S', time.localtime(r.degraded_since))}" if r.degraded_since else ""
        return [f"remote copy {r.cfg.target} is not in step{since}: {r.problem}"]
    if not r.in_step:
        return [f"remote copy {r.cfg.target} does not hold a complete generation yet (catching up)"]
    return []


def status(r: RemoteCopy) -> Dict[str, Any]:
    return {
        "target": str(r.cfg.target),
        "state": "in step" if r.in_step else ("failing" if r.problem else "catching up"),
        "problem": r.problem,
        "degraded_since": r.degraded_since,
        "last_ack": r.last_ack,
        "bytes_sent": r.mirror.bytes_sent,
        "segments_sent_again": r.mirror.restarted,
        "on_failure": r.cfg.on_failure,
    }


def start_remotes(cfgs: Sequence[RemoteConfig], source: str, backup: Any, log: Log) -> RemoteCopies:
    """The synchronous copies of the first destination `source` (as shipping follows it),
    started; `backup` is the fan-out (fanout/destinations.py), which this layer sees only
    through the two calls it makes."""
    first = backup.first
    remotes = RemoteCopies(cfgs, source, lambda: backup.open_segment_of(source), lambda: first.counters, log)
    remotes.start()
    log(f"keeping a synchronous copy on {', '.join(str(c.target) for c in cfgs)}", "info")
    return remotes
