"""Shipping on a schedule: a thread, never the hook, runs a round every `interval` seconds,
retries a failed one with backoff, and reports; the round itself is in shipper.py.

Failures (network, remote host, its disk) never touch or hold back the local backup.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional

from pibackup.copies.rsync import RsyncTransport
from pibackup.copies.shipper import Log, OpenSegment, ShipRound
from pibackup.copies.staging import Staging
from pibackup.copies.target import RcloneTarget, ShipConfig
from pibackup.copies.transport import Transport
from pibackup.errors import PibackupError
from pibackup.store.layout import STAGING_DIR

BACKOFF_INTERVALS = 10  # retries back off to at most ten intervals (10 min by default)


@dataclass
class ShipStatus:
    state: str = "starting"  # starting, ok, failing
    target: str = ""
    encrypted: bool = False
    interval_seconds: float = 0.0
    last_success: Optional[float] = None  # wall clock of the last round that brought the remote in step
    last_attempt: Optional[float] = None
    last_error: Optional[str] = None
    failures_in_a_row: int = 0
    rounds: int = 0
    files_sent: int = 0
    bytes_staged: int = 0


class Shipper:
    """The face the plugin sees: start, ship_now, stop, and what status shows."""

    def __init__(self, cfg: ShipConfig, destination: str, open_segment: OpenSegment, log: Log):
        self.cfg = cfg
        self.destination = destination
        self.staging = os.path.join(destination, STAGING_DIR)
        self.log = log
        self.status_ = ShipStatus(target=str(cfg.target), encrypted=cfg.key is not None, interval_seconds=cfg.interval)
        self.started = time.time()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._logged_error: Optional[str] = None
        # Another way to reach a host is another Transport here; the round does not change.
        self.transport: Transport
        if isinstance(cfg.target, RcloneTarget):
            from pibackup.copies.rclone import RcloneTransport

            self.transport = RcloneTransport(cfg.target, cfg.rclone_config, scratch=self.staging, stopping=self._stop)
        else:
            self.transport = RsyncTransport(
                cfg.target, cfg.port, cfg.identity, cfg.known_hosts, scratch=self.staging, stopping=self._stop
            )
        self.copy = ShipRound(cfg, destination, open_segment, log, self.transport, Staging(destination, cfg.key))

    # --- lifecycle ------------------------------------------------------------------
    def start(self) -> None:
        self.copy.open()
        self._thread = threading.Thread(target=self._loop, name="pibackup-ship", daemon=True)
        self._thread.start()

    def ship_now(self) -> None:
        self._wake.set()

    def stop(self, wait: float = 2.0) -> None:
        """Stop after the current round, or cut it short after `wait` seconds: the next
        start goes on from the saved state (an interrupted append is verified then)."""
        self._stop.set()
        self._wake.set()
        if self._thread is None:
            return
        self._thread.join(wait)
        self.transport.cancel()
        self._thread.join(10)

    def _loop(self) -> None:
        delay = 0.0
        while not self._stop.is_set():
            self._wake.wait(delay)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.round()
                delay = self.cfg.interval
            except Exception as e:  # the shipper must never take the plugin down
                if self._stop.is_set():
                    break
                if isinstance(e, PibackupError):
                    message = str(e)
                elif isinstance(e, OSError):
                    message = f"shipping failed locally: {e.filename or ''}: {e.strerror}"
                else:
                    message = f"shipping failed: {type(e).__name__}: {e}"
                delay = self._failed(message)

    def _failed(self, message: str) -> float:
        s = self.status_
        s.state = "failing"
        s.failures_in_a_row += 1
        s.last_error = message
        if message != self._logged_error:
            self._logged_error = message
            self.log(f"pibackup-ship: {message}. The local backup goes on; retrying.", "warn")
        return float(self.cfg.interval * min(BACKOFF_INTERVALS, 2 ** min(s.failures_in_a_row, 12)))

    def round(self) -> None:
        """One round now, in this thread; its success is recorded here, a failure raised."""
        s = self.status_
        began = time.time()
        s.last_attempt = began
        if self._stop.is_set():
            return
        self.copy.run(retrying=s.failures_in_a_row > 0)
        if s.state == "failing":
            self.log(f"pibackup-ship: {self.cfg.target} reachable again; the remote copy is in step", "info")
        self._logged_error = None
        s.state, s.last_success, s.failures_in_a_row, s.last_error = "ok", began, 0, None
        s.rounds += 1

    # --- what status shows ------------------------------------------------------------------
    def lag(self) -> Optional[float]:
        """Seconds since the remote copy was last in step with the local one."""
        last = self.status_.last_success
        return time.time() - (last if last is not None else self.started)

    def warnings(self) -> List[str]:
        """A lag past pibackup-ship-warn-after. The text stays the same while the cause does,
        so the log gets it once (status.py), not at every check."""
        lag = self.lag()
        if lag is None or lag < self.cfg.warn_after:
            return []
        since = self.status_.last_success
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since if since is not None else self.started))
        what = "last in step at" if since is not None else "never in step since the start at"
        reason = self.status_.last_error or "no successful round yet"
        return [f"shipping to {self.cfg.target} is behind: the remote copy was {what} {when} ({reason})"]

    def status(self) -> Dict[str, Any]:
        s = self.status_
        s.files_sent, s.bytes_staged = self.copy.files_sent, self.copy.staging.bytes_staged  # counted as they happen
        out: Dict[str, Any] = asdict(s)
        lag = self.lag()
        out["lag_seconds"] = None if lag is None else int(lag)
        out["warn_after_seconds"] = self.cfg.warn_after
        return out

