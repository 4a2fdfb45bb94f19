"""Several destinations (pibackup-destination given more than once): a USB stick and a second
SD card, say. Each is a complete backup of its own, written by its own writer (a Writer of
modes/api.py, whatever the mode).

A transaction is acknowledged only once every destination in use has it as durably as the
tiers promise (critical frames synced on all). The writes to the destinations run side by
side, so a sync costs the slowest medium's time, not the sum.

When one fails: with pibackup-on-destination-failure=halt (the default) the node is halted
as for a single destination. With continue-degraded it is dropped, the node goes on with
the others (status and LED warn), and it rejoins once it is usable again, brought in step
from a copy of a healthy destination's generation made in the background (rejoin.py), not
from the live database on the hook's path. With none left, the node halts.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from pibackup.errors import PibackupError
from pibackup.fanout.rejoin import RejoinCopy, finish_copy, prepare_copy
from pibackup.modes.api import Call, Log, Writer
from pibackup.store.access import DestinationError, validate
from pibackup.store.medium import medium

HALT, CONTINUE_DEGRADED = "halt", "continue-degraded"
POLICIES = (HALT, CONTINUE_DEGRADED)
REJOIN_CHECK_SECONDS = 10.0
WRITE_DEADLINE = 30.0


# size: the members, the dropped ones and their rejoining share one lock and one set of fields;
# the copying a rejoin needs is split off already (rejoin.py).
class Destinations:
    def __init__(self, paths: Sequence[str], make: Callable[[str], Writer], policy: str, log: Log):
        self.paths = list(paths)
        self.make = make
        self.policy = policy
        self.log = log
        self.active: List[Writer] = []
        self.dropped: Dict[str, str] = {}  # path -> why, in continue-degraded mode
        self._failure: Optional[str] = None
        self._pool = ThreadPoolExecutor(max_workers=2 * len(paths), thread_name_prefix="pibackup-dest") if len(paths) > 1 else None
        self._rejoin_checked = 0.0
        self._probe: Optional[threading.Thread] = None
        self._usable: set = set()  # dropped paths the probe found usable again
        self._copies: Dict[str, RejoinCopy] = {}  # dropped path -> a healthy generation copied into it
        self._closing = False
        self._lock = threading.Lock()  # guards active/dropped against status() from other threads

    # --- what hook.py and the shipper use from a Writer ------------------------------
    @property
    def first(self) -> Writer:
        return self.active[0]

    @property
    def last(self) -> Optional[int]:
        return self.first.last

    @property
    def last_flush(self) -> Optional[float]:
        flushes = [b.last_flush for b in self.active if b.last_flush is not None]
        return min(flushes) if flushes else None

    @property
    def generation(self) -> Optional[str]:
        return self.first.generation

    @property
    def failure(self) -> Optional[str]:
        return self._failure

    @failure.setter
    def failure(self, message: Optional[str]) -> None:
        # Nothing more reaches any medium once a write was refused (hook.py).
        self._failure = message
        for b in self.active:
            b.failure = message

    def pending_failure(self) -> Optional[str]:
        """A failure a background thread (flusher, compaction's switch) met in a member: the
        next write halts the node on it (halt, or no other destination left). Until then
        status, systemd and the LED say so already."""
        with self._lock:
            failed = [b for b in self.active if b.failure is not None]
            if self._failure is not None or not failed:
                return None
            if self.policy != HALT and len(failed) < len(self.active):
                return None  # warnings() says which one is dropped at the next write
            b = failed[0]
            where = "" if len(self.paths) == 1 else f"destination {b.destination}: "
            return f"{where}{b.failure}. lightningd will be halted at its next database write"

    def open_segment(self) -> Optional[Tuple[str, int]]:
        return self.first.open_segment()

    def open_segment_of(self, path: str) -> Optional[Tuple[str, int]]:
        """The open segment of the destination at `path` (shipping follows one directory)."""
        with self._lock:
            member = next((b for b in self.active if b.destination == path), None)
        if member is None:
            raise DestinationError(f"the destination {path} is not in use (dropped), so its copy is not shipped either")
        return member.open_segment()

    def generation_count(self) -> int:
        return self.first.generation_count()

    # --- start, write, flush, close ---------------------------------------------------------
    def start(self, early: Sequence[Call]) -> None:
        for path in self.paths:
            b = self.make(path)
            try:
                b.start(early)
            except PibackupError as e:
                b.close()
                if self.policy == HALT:
                    self.close()
                    if len(self.paths) == 1:
                        raise
                    raise DestinationError(f"destination {path}: {e}") from e
                self._drop_path(path, str(e))
                continue
            self.active.append(b)
        if not self.active:
            raise DestinationError("no backup destination can be used: " + "; ".join(f"{p}: {w}" for p, w in self.dropped.items()))
        # The physical medium, not st_dev: two partitions of one stick, or two btrfs
        # subvolumes, have st_devs of their own and fail together.
        try:
            media = [medium(b.destination) for b in self.active]
        except OSError:
            media = []  # a destination gone already: its first write says so
        if len(set(media)) < len(media):
            shared = sorted({m for m in media if media.count(m) > 1})
            self.log(
                f"two pibackup-destination directories are on the same medium ({', '.join(shared)}): one failing medium takes both",
                "warn",
            )

    def write(self, data_version: int, writes: List[str]) -> None:
        self._maybe_rejoin(data_version)
        members = list(self.active)
        if len(members) == 1 or self._pool is None:
            errors = self._write_one(members[0], data_version, writes)
        else:
            # All side by side; a medium that hangs (a stick stuck in a sync) gets
            # WRITE_DEADLINE seconds, then counts as failed: dropped, or the node halted.
            futures = [(b, self._pool.submit(self._write_one, b, data_version, writes)) for b in members]
            errors = []
            for b, f in futures:
                try:
                    errors += f.result(timeout=WRITE_DEADLINE)
                except FuturesTimeout:
                    errors.append((b, f"no answer from the medium within {WRITE_DEADLINE:.0f} s (a hung USB stick or card?)"))
        if not errors:
            return
        if self.policy == HALT:
            b, message = errors[0]
            raise DestinationError(message if len(members) == 1 else f"destination {b.destination}: {message}")
        for b, message in errors:
            self._drop(b, message)
        if not self.active:
            raise DestinationError("every backup destination failed: " + "; ".join(f"{p}: {w}" for p, w in self.dropped.items()))

    @staticmethod
    def _write_one(b: Writer, data_version: int, writes: List[str]) -> List[Tuple[Writer, str]]:
        try:
            b.write(data_version, writes)
        except PibackupError as e:
            return [(b, str(e))]
        return []

    def _drop(self, b: Writer, why: str) -> None:
        with self._lock:
            self.active.remove(b)
        # Closing flushes and syncs on the failing medium, which may hang: not on the hook's path.
        threading.Thread(target=self._close_quietly, args=(b,), name="pibackup-drop", daemon=True).start()
        self._drop_path(b.destination, why)

    @staticmethod
    def _close_quietly(b: Writer) -> None:
        try:
            b.close()
        except (PibackupError, OSError):
            pass

    def _drop_path(self, path: str, why: str) -> None:
        with self._lock:
            self.dropped[path] = why
        left = ", ".join(b.destination for b in self.active) or "none"
        self.log(
            f"pibackup: destination {path} dropped: {why}. The node goes on with {left} "
            "(pibackup-on-destination-failure=continue-degraded); it rejoins once usable again",
            "error",
        )

    def _maybe_rejoin(self, data_version: int) -> None:
        """A dropped destination found usable again (by a probe thread: looking at a hung
        medium must not hang the hook) rejoins before this transaction: brought in step from
        a copy of a healthy destination's generation made in the background (rejoin.py), or
        by its own start where no copy can be made, then it gets the transaction."""
        if not self.dropped or self._failure is not None:
            return
        now = time.monotonic()
        if now - self._rejoin_checked >= REJOIN_CHECK_SECONDS and not (self._probe and self._probe.is_alive()):
            self._rejoin_checked = now
            self._probe = threading.Thread(target=self._probe_dropped, name="pibackup-probe", daemon=True)
            self._probe.start()
        for path in list(self._usable):
            self._usable.discard(path)
            copy = self._copies.pop(path, None)
            if path not in self.dropped:
                continue
            how = ""
            if copy is not None:
                if data_version != (copy.source.last or 0) + 1:
                    # Not the next transaction (a resend): only then is the source's last one
                    # known to be committed. The copy is finished at a later call.
                    self._copies[path] = copy
                    self._usable.add(path)
                    continue
                done = finish_copy(copy, copy.source in self.active, self.log)
                if done is None:
                    continue  # the next probe copies again
                how = done
            b = self.make(path)
            if copy is not None and hasattr(b, "committed_through"):
                b.committed_through = data_version - 1  # no commit mark needed
            try:
                b.start([])
            except PibackupError as e:
                b.close()
                self.dropped[path] = str(e)
                self.log(f"pibackup: destination {path} could not rejoin: {e}", "warn")
                continue
            with self._lock:
                self.active.append(b)
                del self.dropped[path]
            self.log(f"pibackup: destination {path} is back and in step at data_version {b.last}{how}", "info")

    def _probe_dropped(self) -> None:
        for path in list(self.dropped):
            try:
                validate(path)
                if os.statvfs(path).f_flag & os.ST_RDONLY:
                    continue
            except (PibackupError, OSError):
                continue
            if self._prepare_copy(path):
                self._usable.add(path)

    def _prepare_copy(self, path: str) -> bool:
        """In the probe thread: whether `path` may rejoin at the next write (a copy of a
        healthy generation made, or none possible); False: try again at the next probe."""
        if path in self._copies or not self.active:
            return bool(self.active)
        copy = prepare_copy(self.active[0], path, self.log, lambda: self._closing)
        if copy is False:
            return False
        if copy is not None:
            self._copies[path] = copy
        return True

    def flush(self) -> None:
        errors = []
        for b in list(self.active):
            try:
                b.flush()
            except PibackupError as e:
                errors.append((b, str(e)))
        if errors and (self.policy == HALT or len(errors) == len(self.active)):
            raise DestinationError(errors[0][1])
        for b, message in errors:
            self._drop(b, message)

    def close(self) -> None:
        self._closing = True
        for b in list(self.active):
            b.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    # --- status -------------------------------------------------------------------------------
    def warnings(self) -> List[str]:
        with self._lock:
            on = ", ".join(b.destination for b in self.active) or "nothing"
            out = [f"destination {p} is not in use ({why}); the backup is on {on} only" for p, why in self.dropped.items()]
            for b in self.active:
                out += b.warnings()  # the mode's own: a roll-over failing, a damaged generation
            if self.policy != HALT and self._failure is None:
                out += [
                    f"destination {b.destination} failed ({b.failure}); it is dropped at lightningd's next write"
                    for b in self.active
                    if b.failure
                ]
            return out

    def status(self) -> Dict[str, Any]:
        with self._lock:
            members = list(self.active)
            dropped = dict(self.dropped)
        out = members[0].status()
        out["destinations"] = []
        for b in members:
            s = b.status()
            d = s["destinations"][0]
            d.update(state="ok", generation=s["generation"], data_version=s["data_version"], counters=s["counters"])
            out["destinations"].append(d)
        for p, why in dropped.items():
            out["destinations"].append({"path": p, "state": "dropped", "reason": why})
        out["on_destination_failure"] = self.policy
        return out
