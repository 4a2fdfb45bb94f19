"""The compaction's processes, seen from the plugin: started (or kept ready ahead), given their
job, answered while they follow the journal, and their result read (messages.py's lines)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from typing import Callable, Optional, Tuple, Union

from pibackup.compaction.messages import At, Built, Done, Failed, Job, More, Nothing, Start, decode_result
from pibackup.compaction.newgen import _CAUGHT_UP_BYTES, Stopped
from pibackup.modes.journal.port import CompactionError, GenerationDamaged
from pibackup.store import directory as dst

# A compaction process started ahead and not used by then is stopped (shorter in tests).
SPARE_IDLE = float(os.environ.get("PIBACKUP_TEST_SPARE_IDLE", 60.0))
# The child's entry point, run as `python3 -I -c CODE ARGV`: its module path and import root.
CHILD_MODULE = "pibackup.compaction.child"


class Processes:
    """The process running a compaction's job, and the next one started ahead (the spare)."""

    def __init__(self) -> None:
        self.child: Optional[subprocess.Popen[bytes]] = None  # running a job: stop() kills it
        # At a high rate a compaction's own start-up (a new Python process) is a good part of
        # it, and the journal written meanwhile is held twice; so when the next compaction is
        # near as one ends, its process is started at once and waits for its job.
        self.spare: Optional[Tuple[subprocess.Popen[bytes], float]] = None  # (process, time.monotonic() started)
        self.started_ahead = 0

    def spawn(self) -> subprocess.Popen[bytes]:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # above pibackup/compaction/
        code = f"import sys; sys.path.insert(0, {root!r}); from {CHILD_MODULE} import child_main; child_main()"
        return subprocess.Popen(  # -I (isolated), as the Debian package runs the plugin itself
            [sys.executable, "-I", "-c", code, Start(os.getpid()).encode()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def start_spare(self) -> None:
        """Start the next compaction's process now (the caller judged it due soon)."""
        self.spare = (self.spawn(), time.monotonic())
        self.started_ahead += 1

    def spare_idle_left(self) -> Optional[float]:
        """Seconds until the spare is stopped unused; None without one."""
        return None if self.spare is None else SPARE_IDLE - (time.monotonic() - self.spare[1])

    def drop_spare(self) -> None:
        spare, self.spare = self.spare, None
        if spare is not None:
            spare[0].kill()
            spare[0].communicate()

    def kill(self) -> None:
        child = self.child
        if child is not None and child.poll() is None:
            child.kill()

    def run(
        self, job: Job, src: dst.Generation, position: Callable[[int], Optional[Tuple[int, int]]], stop: threading.Event
    ) -> Optional[Built]:
        """The child's result for `job`: the new snapshot, or None when there was nothing to
        compact. `position(generation)` is the writer's durable end (CompactionPort.position)."""
        spare, self.spare = self.spare, None
        if spare is not None and spare[0].poll() is not None:
            spare[0].communicate()
            spare = None
        child = spare[0] if spare is not None else self.spawn()
        self.child = child
        try:
            out = _converse(child, src, job, position, stop)
            err = child.communicate()[1]
        finally:
            self.child = None
        if stop.is_set():
            raise Stopped()
        if child.returncode != 0 or not out:
            tail = err.decode(errors="replace").strip().splitlines()[-1:] or [f"exit status {child.returncode}"]
            raise CompactionError(f"the compaction process died ({tail[0]})")
        result = decode_result(out)
        if isinstance(result, Failed):
            kind = GenerationDamaged if result.damaged else CompactionError
            raise kind(f"cannot build the new snapshot from {src.name}: {result.error}")
        if isinstance(result, Nothing):
            return None
        return result


def _converse(
    child: subprocess.Popen[bytes],
    src: dst.Generation,
    job: Job,
    position: Callable[[int], Optional[Tuple[int, int]]],
    stop: threading.Event,
) -> bytes:
    """Send the job; answer each "at" (how far the child has replayed) with how far the
    writer has made the journal durable since, until less than _CAUGHT_UP_BYTES is left
    (then "done": the child finishes the snapshot). Returns the result line (b"" if the
    child died or stopped)."""
    assert child.stdin is not None and child.stdout is not None
    try:
        child.stdin.write(job.encode().encode())
        child.stdin.flush()
        while True:
            line = child.stdout.readline()
            at = At.decode(line)
            if at is None:
                return line
            pos = position(src.number)
            more = pos is not None and (pos[0] != at.segment or pos[1] - at.offset >= _CAUGHT_UP_BYTES) and not stop.is_set()
            reply: Union[More, Done] = More(*pos) if pos is not None and more else Done()
            child.stdin.write(reply.encode().encode())
            child.stdin.flush()
    except (BrokenPipeError, ValueError):
        return b""  # (communicate() then closes its stdin and collects what is left)
