"""The compactor thread in the plugin: when a generation is due for compaction (its journal
passes a share of its snapshot, or on request), and the steps of one; and retention after it.

It reaches the journal writer only through its port (modes/journal/port.py) and is the
writer's CompactionHooks. Steps, and what a crash at each leaves, are in FORMAT.md ("Compaction").
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
import time
from typing import Any, Dict, Optional

from pibackup.compaction.child import _describe
from pibackup.compaction.messages import Job
from pibackup.compaction.newgen import NewGeneration, Stopped
from pibackup.compaction.process import Processes
from pibackup.compaction.retention import apply_retention
from pibackup.errors import DamageError, PibackupError
from pibackup.modes.journal.port import CompactionPort, GenerationDamaged, Superseded
from pibackup.testpoints import crash_point

RETRY_AFTER_FAILURE = 3600.0  # automatic retries of a failed compaction; the RPC retries at once
CHECK_INTERVAL = 30.0  # the thread also wakes at once when a flush crosses the threshold


class Compactor:
    """Watches the writer's generation; compacts it in the background when its journal
    passes `ratio` times its snapshot (and `min_bytes`), or when asked."""

    def __init__(self, ratio: float, min_bytes: int, keep: int, log: Any):
        self.ratio = ratio
        self.min_bytes = min_bytes
        self.keep = keep
        self.log = log
        self._port: Optional[CompactionPort] = None  # the writer, once bound
        self.state = "idle"  # idle, running or failed
        self.step = ""
        self.error: Optional[str] = None
        self.last: Optional[Dict[str, Any]] = None
        self.runs = 0
        self._failed_at: Optional[float] = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._manual = False
        self._retain = True  # once at start (keep-generations may have been lowered), and after a gap
        self.processes = Processes()
        self._source = ""  # the generation being compacted
        # Journal bytes written to the previous generation while it was being compacted (at a
        # high rate, a good part of a threshold): it keeps them, and the new generation holds
        # them again, so they are taken off the new generation's threshold. The kept
        # generations' journals then stay within about two thresholds at any rate.
        self.overshoot = 0
        self._thread = threading.Thread(target=self._loop, name="pibackup-compactor", daemon=True)

    @property
    def port(self) -> CompactionPort:
        assert self._port is not None, "Compactor.bind() was not called"
        return self._port

    def bind(self, port: CompactionPort) -> None:
        """The writer it compacts (built after the compactor: the writer takes its hooks)."""
        self._port = port

    def start(self) -> None:
        self._thread.start()

    def flushed(self, journal_bytes: int, snapshot_bytes: int) -> None:
        """The writer flushed (under its lock): wake the thread once the journal passes the threshold."""
        if self.state != "running":
            limit = self.threshold(snapshot_bytes)
            if limit is not None and journal_bytes >= limit:
                self._wake.set()

    def threshold(self, snapshot_bytes: int) -> Optional[int]:
        """Journal bytes at which the generation is compacted; None when automatic compaction is off."""
        if self.ratio <= 0:
            return None
        return max(self.min_bytes, int(self.ratio * snapshot_bytes) - self.overshoot)

    def request(self) -> str:
        """`lightning-cli pibackup-compact`: start one now (in the background)."""
        if self.state == "running":
            return "already running"
        if self.port.state().damaged is not None:
            return "refused"  # its replacement is a snapshot of the live database, at the next write
        self.state, self.step, self.error = "running", "queued", None
        self._manual = True
        self._wake.set()
        return "started"

    def wake(self) -> None:
        self._wake.set()

    def new_generation(self) -> None:
        """A new generation started (a gap): apply retention in the background."""
        self.overshoot = 0
        self._failed_at = None  # a failure compacting the old generation says nothing of the new one
        self._retain = True
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self.processes.kill()
        if self._thread.is_alive():
            self._thread.join()
        self.processes.drop_spare()

    def status(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"state": self.state, "runs": self.runs, "processes_started_ahead": self.processes.started_ahead}
        if self.state == "running":
            out["step"] = self.step
        if self.error:
            out["error"] = self.error
        if self.last:
            out["last"] = self.last
        journal_bytes, snapshot_bytes = self.port.sizes()
        out["journal_bytes"] = journal_bytes
        out["snapshot_bytes"] = snapshot_bytes
        out["compact_at_bytes"] = self.threshold(snapshot_bytes)
        out["keep_generations"] = self.keep
        return out

    # --- the thread ---------------------------------------------------------------------
    def _due(self) -> bool:
        if self.port.state().damaged is not None:
            return False  # the next write replaces the generation: compacting it would only read the damage again
        if self._manual:
            return True
        journal_bytes, snapshot_bytes = self.port.sizes()
        limit = self.threshold(snapshot_bytes)
        if limit is None or journal_bytes < limit:
            return False
        return self._failed_at is None or time.monotonic() - self._failed_at >= RETRY_AFTER_FAILURE

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self._retain:
                self._retain = False
                try:
                    current = self.port.state().number
                    if current is not None:
                        apply_retention(self.port.dest, self.keep, self.log, protect=current)
                except OSError as e:
                    self.log(f"could not delete an old backup generation: {_describe(e)}", "warn")
            spare_left = self.processes.spare_idle_left()
            if spare_left is None:
                spare_left = CHECK_INTERVAL
            self._wake.wait(max(0.0, min(CHECK_INTERVAL, spare_left)))
            self._wake.clear()
            failed = self.port.state().failure is not None
            if self._stop.is_set() or failed or not self._due():
                left = self.processes.spare_idle_left()
                if left is not None and (failed or left <= 0):
                    self.processes.drop_spare()
                continue
            self._manual = False
            self.state, self.error, self.step = "running", None, "cut"
            started = time.monotonic()
            try:
                try:
                    self.last = self._compact()
                finally:
                    self.port.trim_closed()  # the segment the switch closed: off the hook's path
                if self.last is not None:
                    self.last["seconds"] = round(time.monotonic() - started, 3)
                    self.runs += 1
                self.state, self._failed_at = "idle", None
            except Stopped:
                self.state = "idle"
            except Superseded as e:
                self.state = "idle"
                self.log(str(e), "info")
            except (GenerationDamaged, DamageError) as e:
                # The generation being written to cannot be restored whole: the fix is a new
                # generation from the live database, not a retry of this compaction. (The
                # state first: the new generation's retain() resets _failed_at.)
                self.state, self.error, self._failed_at = "failed", str(e), self._failure_time()
                self.port.mark_damaged(self._source, str(e))
            except Exception as e:  # a failed compaction never fails the backup: it goes on in the old generation
                msg = _describe(e) if isinstance(e, (OSError, sqlite3.Error)) else str(e)
                if not isinstance(e, (PibackupError, OSError, sqlite3.Error)):
                    msg = f"internal error ({type(e).__name__}: {e}); please report it"
                self.state, self.error, self._failed_at = "failed", msg, self._failure_time()
                if self.port.state().failure is not None:
                    self.log(f"compaction failed: {msg}", "warn")  # and the backup with it: logged as an error already
                    continue
                self.log(
                    f"compaction failed: {msg}. The backup goes on in the current generation; the next automatic "
                    f"attempt is in {int(RETRY_AFTER_FAILURE // 60)} minutes, or run lightning-cli pibackup-compact",
                    "warn",
                )

    def _failure_time(self) -> Optional[float]:
        """When the failed compaction's generation is still the writer's: the retry waits.
        After a gap (whose retain() may already have run) the new generation owes it nothing."""
        return time.monotonic() if self.port.state().generation == self._source else None

    def _compact(self) -> Optional[Dict[str, Any]]:
        b = self.port
        self._source = b.state().generation or ""  # until the cut says which one
        cut = b.cut()  # under the writer's lock: where the durable journal ends
        if cut is None:
            if b.state().failure is None:
                self.log("nothing to compact: no transaction committed since the current generation's snapshot", "info")
            return None
        src, segments, length, checksum, number = cut.generation, cut.segment, cut.length, cut.checksum, cut.number
        self._source = src.path  # for a damage found on the way (_loop)
        crash_point("cut")
        partial = ""
        target: Optional[NewGeneration] = None
        try:
            self.step = "retention"
            # The generation being built counts toward keep-generations: older ones go now, so
            # the medium never holds more than `keep` generations' worth (FORMAT.md, Retention).
            apply_retention(b.dest, max(1, self.keep - 1), self.log, protect=src.number, configured=self.keep)
            self.step = "snapshot"
            partial = b.dest.begin_generation(number)
            job = Job(b.destination, src.number, segments, length, checksum, partial)
            built = self.processes.run(job, src, b.position, self._stop)
            if built is None:
                shutil.rmtree(partial, ignore_errors=True)
                self.log(f"nothing to compact: {src.name} holds no committed transaction after its snapshot yet", "info")
                return None
            self.step = "journal"
            self._spare_if_busy(b.sizes()[0] - cut.journal_bytes)
            target = NewGeneration(b, partial, number, built, src)
            crash_point("segment")
            target.follow(src, segments, length, checksum, self._stop)
            self.step = "switch"
            target.writer.preallocate_ahead(target.chunk)  # the zeros now, not on the hook's next call
            switched = b.switch(target.source_number, target.finish)  # under the writer's lock
            target.adopted = True
            final = switched.generation
            # The old generation stays (keep >= 2) holding what it grew by.
            self.overshoot = switched.grown if self.keep >= 2 else 0
            partial = ""
            self.step = "retention"
            apply_retention(b.dest, self.keep, self.log, protect=number)
        except BaseException:
            if target is not None:
                target.abort()
            if partial:
                shutil.rmtree(partial, ignore_errors=True)
            raise
        finally:
            b.release()
        self.log(
            f"compacted {src.name} into {os.path.basename(final)}: snapshot at data_version {built.version} "
            f"({built.snapshot_bytes:,} bytes) from {built.transactions:,} journalled transactions",
            "info",
        )
        return {
            "generation": os.path.basename(final),
            "from": src.name,
            "base_version": built.version,
            "snapshot_bytes": built.snapshot_bytes,
            "transactions": built.transactions,
            "finished": int(time.time()),
        }

    def _spare_if_busy(self, tail: int) -> None:
        """Start the next compaction's process now if `tail`, the journal written during a
        compaction (held by both generations), is a good part of a threshold: at such a rate
        the next compaction is due soon after this one, and its start-up would lengthen it."""
        if self.ratio <= 0 or self.processes.spare is not None:
            return
        if tail >= max(self.min_bytes, int(self.ratio * self.port.sizes()[1])) // 4:
            try:
                self.processes.start_spare()
            except OSError as e:  # only a head start lost: the next compaction starts its own
                self.log(f"could not start the next compaction's process ahead: {e}", "debug")
