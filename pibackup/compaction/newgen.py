"""The generation a compaction builds: its snapshot is the child's, its journal the tail of
the old generation's, copied frame by frame while the hook appends, the rest at the switch."""

from __future__ import annotations

import threading
from typing import Optional, Tuple

from pibackup.compaction.messages import Built
from pibackup.modes.journal.port import CompactionError, CompactionPort, Finished, Superseded
from pibackup.rules.replayguard import Refused, check_frame
from pibackup.store import directory as dst
from pibackup.store.appender import create_segment, first_header, roll_over
from pibackup.store.follow import JournalFollower
from pibackup.store.replay import refused_damage
from pibackup.store.segment import KIND_INFO, KIND_PRAGMA, Frame
from pibackup.testpoints import crash_point

_CAUGHT_UP_BYTES = 64 * 1024  # copy at most about this much while holding the writer's lock
_COPY_BATCH = 64 * 1024  # frames copied per write + fdatasync (small for peak RSS; one sync under the lock)


class Stopped(Exception):
    """The plugin is stopping: the compaction is dropped, its `.partial` removed."""


class NewGeneration:
    """The `.partial` generation being written: its snapshot is done, its journal is the
    tail of the old generation's, copied frame by frame."""

    def __init__(self, b: CompactionPort, partial: str, number: int, built: Built, src: dst.Generation):
        self.port = b
        self.adopted = False  # the writer went on in its open segment (the switch)
        self.partial = partial
        self.number = number
        self.version = built.version
        header = first_header(number, self.version, built.sha256, b.segment_settings.flags)
        # No zeros ahead while only the tail is copied in: the hook's appends get them after
        # the switch (they would be space held twice while both generations are on the medium).
        self.chunk = b.segment_settings.chunk_for(built.snapshot_bytes)
        self.writer = create_segment(partial, header, 0)
        self.writer.add(KIND_INFO, self.version, b.info_lines())
        self.last = self.version
        for kind, version, statements in built.pending:
            self.writer.add(kind, version, statements)
            self.last = version
        self.writer.flush()
        self.closed_bytes = 0  # valid bytes of the new generation's closed segments
        self._follower: Optional[JournalFollower] = None
        self._end = built.end  # the child replayed up to here
        self.source_number = src.number

    def add(self, frame: Frame, where: str = "") -> None:
        if frame.kind == KIND_INFO:
            return
        try:
            # Frames the child did not replay: a statement a restore would refuse is never
            # carried into the new generation (the old one is damaged: JournalPort.mark_damaged).
            check_frame(frame.statements, frame.kind == KIND_PRAGMA)
        except Refused as e:
            raise refused_damage(e, where or f"{self.partial} (copying)", frame.data_version, frame.offset) from e
        if frame.data_version not in (self.last, (self.last + 1) & 0xFFFFFFFF):
            # Each frame appends, rewinds or repeats the version (FORMAT.md, replay rules):
            # anything else would make the new generation unrestorable. Never switch to it.
            raise CompactionError(
                f"the journal to copy does not follow the new snapshot: data_version {frame.data_version} "
                f"after {self.last} (internal error; please report it)"
            )
        self.last = frame.data_version
        self.writer.add(frame.kind, frame.data_version, frame.statements)
        if self.writer.pending_bytes >= _COPY_BATCH:  # memory stays bounded however far behind
            self.flush()

    def flush(self) -> None:
        w = self.writer
        w.flush()
        if w.size >= self.port.segment_bytes:
            self.writer = roll_over(self.partial, w, w.header.flags, w.preallocate)
            self.closed_bytes += w.size
            w.close()

    def follow(self, src: dst.Generation, first: int, offset: int, checksum: int, stop: threading.Event) -> None:
        """Copy the old generation's frames from the cut (`offset` of segment `first`;
        `checksum` is the chain value there) on, those the child replayed left out, while
        the hook keeps appending to it, until little is left to copy: the rest is copied
        under the lock."""
        self._follower = JournalFollower(src.path, first, offset, checksum, skip_to=self._end)
        while True:
            if stop.is_set():
                raise Stopped()
            self.copy_available(*self._position(src))
            self.flush()
            crash_point("follow")
            # Caught up when little is left behind the writer: that rest is copied under its
            # lock. Otherwise go on at once (no pause: at a high rate a pause only lets the
            # tail grow, and the tail is held by both generations).
            segment, durable = self._position(src)
            at, offset_read = self._follower.position()
            if at == segment and durable - offset_read < _CAUGHT_UP_BYTES:
                return

    def _position(self, src: dst.Generation) -> Tuple[int, int]:
        state = self.port.position(src.number)
        if state is None:
            raise Superseded("a new generation was started meanwhile (a gap); this compaction is dropped")
        return state

    def copy_available(self, segment: int, durable: int, checksum: Optional[int] = None) -> None:
        """Copy the frames of the old generation up to (`segment`, `durable` bytes): what its
        writer has made durable (`checksum`: its chain value there, when known)."""
        assert self._follower is not None
        for f, where in self._follower.frames(segment, durable, checksum):
            self.add(f, where)

    def finish(self, segment: int, durable: int, checksum: int) -> Finished:
        """At the switch, under the writer's lock: copy the frames up to the writer's durable
        end (`checksum`: its chain value there) and sync them."""
        first = self.writer.header.segment
        self.copy_available(segment, durable, checksum)
        self.flush()
        self.close()
        return Finished(self.partial, self.writer, self.closed_bytes, self.version, dir_synced=self.writer.header.segment == first)

    def close(self) -> None:
        if self._follower is not None:
            self._follower.close()

    def abort(self) -> None:
        """A failed compaction: close its files (the caller removes the .partial)."""
        self.close()
        if not self.adopted:
            self.writer.close()
