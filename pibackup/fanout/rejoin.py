"""A dropped destination rejoins from a copy of a healthy one's generation, made in the background.

Without it a destination that fell behind would be brought in step on the hook's path, from a
snapshot of the live database: a whole database's worth of writes while lightningd waits. Here
the probe thread copies the healthy destination's current generation (its snapshot, its
segments, the open one up to what is durable) into DEST/gen-NNNNNN.partial while the hook goes
on. At lightningd's next write the hook copies only what was appended since, syncs, renames the
`.partial` into place, and the destination's writer starts on it as after a restart: it holds
the healthy one's last transaction, so it continues that generation in a segment of its own.

The copy keeps the generation's number (its segments' headers carry it), so it is made only
when the dropped destination holds no generation of that number or above; otherwise, and for
a mode without segments (replica), the writer's own start brings the destination in step.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Callable, Dict, Literal, Optional, Union

from pibackup.errors import PibackupError
from pibackup.modes.api import Log, Writer
from pibackup.store import directory as dst
from pibackup.store.access import MARKER_TEXT
from pibackup.store.fsio import IO_CHUNK, fsync_dir, write_text_durably
from pibackup.store.layout import GENERATION_RE, MARKER, PARTIAL_SUFFIX, SEGMENT_RE, SNAPSHOT_RE

PROGRESS_SECONDS = 10.0
CAUGHT_UP_BYTES = 256 * 1024  # left for the hook to copy at most (one sync per file it touches)


class Outdated(Exception):
    """The healthy destination moved to another generation (a compaction) while it was copied."""


class RejoinCopy:
    """The copy of `source`'s current generation into the dropped destination `target`."""

    def __init__(self, source: Writer, target: str, log: Log, stopping: Callable[[], bool] = lambda: False):
        self.source = source
        self.target = target
        self.log = log
        self.stopping = stopping
        self.generation = source.generation or ""
        self.name = os.path.basename(self.generation)
        self.partial = os.path.join(target, self.name + PARTIAL_SUFFIX)
        self.copied: Dict[str, int] = {}  # file name -> bytes copied (and synced)
        self.bytes_in_background = 0
        self.bytes_at_switch = 0
        self._progress_at = time.monotonic()

    @staticmethod
    def possible(source: Writer, target: str) -> Optional[str]:
        """Why no copy can be made (None: it can)."""
        gen = source.generation
        m = GENERATION_RE.match(os.path.basename(gen or ""))
        if gen is None or m is None or source.open_segment() is None:
            return "the healthy destination has no journal generation to copy"
        if dst.damage_mark(gen) is not None:
            return "the healthy destination's generation is marked damaged"
        number = int(m.group(1))
        held = [int(g.group(1)) for g in map(GENERATION_RE.match, os.listdir(target)) if g]
        if held and max(held) >= number:
            return f"it holds a generation numbered {max(held)}, not older than the healthy one's {number}"
        return None

    # --- in the background ------------------------------------------------------------
    def copy_in_background(self) -> None:
        """Copy until what is left is small; raises Outdated or OSError (the caller retries later)."""
        marker = os.path.join(self.target, MARKER)
        if not os.path.exists(marker):
            # An empty directory (a new card): marked as pibackup's first, as a writer's start
            # does, or the generation put beside nothing would make it someone else's directory.
            write_text_durably(marker, MARKER_TEXT)
        if os.path.lexists(self.partial):
            shutil.rmtree(self.partial)  # a copy begun before and given up
        os.mkdir(self.partial, 0o700)
        while not self.stopping():
            moved = self._copy_round(hook=False)
            self.bytes_in_background += moved
            if moved <= CAUGHT_UP_BYTES:
                return

    # --- on the hook's path -----------------------------------------------------------
    def finish(self) -> str:
        """Copy what was appended since, make the copy durable and visible; its final path."""
        self.source.flush()  # bulk frames answered but still in memory: the copy must hold them
        self.bytes_at_switch = self._copy_round(hook=True)
        fsync_dir(self.partial)
        final = self.partial[: -len(PARTIAL_SUFFIX)]
        os.rename(self.partial, final)
        fsync_dir(self.target)
        return final

    def discard(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)

    # --- the copying --------------------------------------------------------------------
    def _copy_round(self, hook: bool) -> int:
        """Bring every file of the generation up to what is durable at the source now."""
        open_seg = self.source.open_segment()
        if self.source.generation != self.generation or open_seg is None:
            raise Outdated(f"{self.name} was compacted into a newer generation while it was copied")
        open_path, open_size = open_seg
        moved = 0
        for name in sorted(os.listdir(self.generation)):
            if not (SNAPSHOT_RE.match(name) or SEGMENT_RE.match(name)):
                continue  # files being written (.tmp) and marks are not part of a generation's data
            src = os.path.join(self.generation, name)
            if src == open_path:
                upto: Optional[int] = open_size  # zeros written ahead and frames not yet synced stay behind
            else:
                upto = None  # a snapshot or a closed segment: no longer written
                if name in self.copied and SNAPSHOT_RE.match(name):
                    continue
            moved += self._copy_file(src, os.path.join(self.partial, name), upto)
            if not hook and time.monotonic() - self._progress_at >= PROGRESS_SECONDS:
                self._progress_at = time.monotonic()
                done = self.bytes_in_background + moved
                self.log(f"destination {self.target}: copying {self.name} from a healthy destination, {done >> 20} MiB so far", "info")
        return moved

    def _copy_file(self, src: str, dest: str, upto: Optional[int]) -> int:
        """Append to `dest` the bytes of `src` it lacks (up to `upto`), sync it; bytes copied."""
        have = self.copied.get(os.path.basename(dest), 0)
        with open(src, "rb") as f:
            end = os.fstat(f.fileno()).st_size if upto is None else upto
            if end <= have:
                return 0
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                pos = have
                while pos < end:
                    chunk = os.pread(f.fileno(), min(IO_CHUNK, end - pos), pos)
                    if not chunk:
                        end = pos  # a closed segment's zeros given back meanwhile: all it holds is here
                        break
                    os.pwrite(fd, chunk, pos)
                    pos += len(chunk)
                os.fsync(fd)
            finally:
                os.close(fd)
        # The .partial's directory is synced once, by finish(), before its rename.
        self.copied[os.path.basename(dest)] = end
        return end - have


def prepare_copy(source: Writer, target: str, log: Log, stopping: Callable[[], bool]) -> Union[RejoinCopy, None, Literal[False]]:
    """In the probe thread: copy `source`'s generation into the dropped `target`. The copy; None
    when none can be made (the writer's own start brings `target` in step); False when it
    failed this time (the next probe tries again)."""
    why = RejoinCopy.possible(source, target)
    if why is not None:
        log(f"destination {target} is brought in step by its own start ({why})", "info")
        return None
    copy = RejoinCopy(source, target, log, stopping)
    try:
        copy.copy_in_background()
    except (Outdated, OSError, PibackupError) as e:
        copy.discard()
        log(f"destination {target}: copying {copy.name} from {source.destination} failed ({e}); trying again", "info")
        return False
    return copy


def finish_copy(copy: RejoinCopy, source_active: bool, log: Log) -> Optional[str]:
    """On the hook's path: make the copy whole and visible. What to add to the rejoin's log
    line; None when it could not be finished (discarded: the next probe copies again)."""
    if not source_active:
        copy.discard()  # its source was dropped meanwhile
        return None
    try:
        copy.finish()  # only what was appended since the background copy
    except (Outdated, OSError, PibackupError) as e:
        copy.discard()
        log(f"destination {copy.target}: the copy of {copy.name} could not be finished ({e}); trying again", "info")
        return None
    return (
        f" ({copy.name} copied from {copy.source.destination}: {copy.bytes_in_background:,} bytes in the "
        f"background, {copy.bytes_at_switch:,} while lightningd waited)"
    )
