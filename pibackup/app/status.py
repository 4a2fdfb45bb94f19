"""What a Pi owner sees: systemd's status line, the board's LED, warnings in the log.

A monitor thread looks at the backup every few seconds; a failure is reported at once.
"""

from __future__ import annotations

import errno
import os
import pwd
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from pibackup.errors import PibackupError
from pibackup.store.access import access_problems

Log = Callable[[str, str], None]

OK, WARNING, FAILED = "ok", "warning", "failed"
REMINDER_SECONDS = 3600.0  # a persisting problem is logged once, then this often
STATUS_MIN_INTERVAL = 5.0  # sd_notify rate limit when nothing changed but the figures


class StatusError(PibackupError):
    pass


@dataclass
class Health:
    state: str = OK  # ok, warning or failed
    warnings: List[str] = field(default_factory=list)
    failure: Optional[str] = None


_NUMBER = re.compile(r"\d[\d,.]*")


def check_destination(path: str, min_free_bytes: int) -> List[str]:
    """Early warnings about the medium: low free space, a read-only remount, a vanished mount,
    and who else can change the backup (destination.access_problems)."""
    try:
        st = os.statvfs(path)
    except OSError as e:
        return [f"cannot look at {path}: {e.strerror} (was the USB stick unplugged?)"]
    out = []
    if st.f_flag & os.ST_RDONLY:
        out.append(f"{path} is now read-only (the kernel remounts a failing medium read-only): check or replace it")
    free = st.f_bavail * st.f_frsize
    if free < min_free_bytes:
        out.append(
            f"only {free // (1024 * 1024)} MiB free on {path} (warning below {min_free_bytes // (1024 * 1024)} MiB): "
            "free space or move the backup to a bigger medium"
        )
    for p in access_problems(path):
        # The running writer only reads what it wrote itself; a restore, verify and the
        # next start refuse a backup that holds another user's files.
        out.append(p.message + (". The backup goes on, but restore and the next start refuse it until then" if p.foreign else ""))
    return out


LED_GROUP = "pibackup-led"  # made by the Debian package, whose udev rule gives it the LEDs
TIMER_FILES_WAIT = 0.5  # seconds for udev to hand over the timer trigger's files


def _user() -> str:
    """The plugin's user (lightningd's), as adduser wants it."""
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


class Led:
    """A board LED through sysfs: heartbeat when healthy, fast blink on warnings, steady on
    when the backup failed. The LED's own trigger is put back on a clean exit."""

    PATTERNS = {OK: "heartbeat", WARNING: "timer", FAILED: "none"}

    def __init__(self, name: str, led_dir: str):
        self.path = os.path.join(led_dir, name)
        trigger = os.path.join(self.path, "trigger")
        try:
            with open(trigger) as f:
                text = f.read()
        except OSError as e:
            raise StatusError(
                f"pibackup-led={name}: cannot read {trigger} ({e.strerror}); list the board's LEDs with "
                f"ls {led_dir} (ACT on current Raspberry Pis, led0 on older ones), or set pibackup-led=none"
            ) from e
        # sysfs lists every trigger and brackets the active one: "none [mmc0] timer heartbeat"
        words = text.split()
        active = [w[1:-1] for w in words if w.startswith("[") and w.endswith("]")]
        self.previous = active[0] if active else (words[0] if words else "none")
        self.shown: Optional[str] = None

    def _write(self, name: str, value: str) -> None:
        with open(os.path.join(self.path, name), "w") as f:
            f.write(value)

    def _write_timer(self, name: str, value: str) -> None:
        """delay_on and delay_off appear with the timer trigger, root's at first: the udev rule
        hands them to the LED group at the "change" event that trigger sends. Wait for it."""
        deadline = time.monotonic() + TIMER_FILES_WAIT
        while True:
            try:
                return self._write(name, value)
            except (PermissionError, FileNotFoundError):
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    def problem(self, e: OSError) -> str:
        """What to do when the LED cannot be driven."""
        if e.errno not in (errno.EACCES, errno.EPERM):
            return f"cannot drive the LED at {self.path}: {e.strerror}"
        return (
            f"cannot drive the LED at {self.path}: permission denied (its files are root's). Run "
            f"sudo adduser {_user()} {LED_GROUP} (the package's udev rule gives that group the LEDs), "
            "then restart lightningd (sudo systemctl restart lightningd); see docs/guide/status.md"
        )

    def show(self, state: str) -> None:
        if state == self.shown:
            return
        self._write("trigger", self.PATTERNS[state])
        if state == WARNING:
            self._write_timer("delay_on", "100")
            self._write_timer("delay_off", "100")
        elif state == FAILED:
            try:
                with open(os.path.join(self.path, "max_brightness")) as f:
                    level = f.read().strip() or "1"
            except OSError:
                level = "1"
            self._write("brightness", level)
        self.shown = state

    def restore(self) -> None:
        self._write("trigger", self.previous)


class Reporter:
    """Turns the backup's state into a STATUS= line, an LED pattern and log lines.

    `snapshot()` returns the figures for the status line; it must be cheap.
    """

    def __init__(
        self,
        log: Log,
        snapshot: Callable[[], Dict[str, Any]],
        destinations: Callable[[], List[str]],
        min_free_bytes: int,
        extra_warnings: Callable[[], List[str]] = list,
        led: Optional[Led] = None,
        notify: Optional[Callable[[str], None]] = None,
        interval: float = 10.0,
        pending_failure: Callable[[], Optional[str]] = lambda: None,
    ):
        self.log = log
        self.snapshot = snapshot
        self.destinations = destinations
        self.min_free_bytes = min_free_bytes
        self.extra_warnings = extra_warnings
        self.led = led
        self.notify = notify
        self.interval = interval
        self.pending_failure = pending_failure
        self._failed: Optional[str] = None  # set by failed(): final
        self.health = Health()
        self.started = time.time()
        self._lock = threading.Lock()
        self._last_status: Optional[str] = None
        self._last_sent = 0.0
        self._logged: Dict[str, float] = {}  # message (its numbers left out) -> when it was last logged
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # --- what is wrong -----------------------------------------------------------
    def failed(self, message: str) -> None:
        """The backup cannot go on: steady LED, status line, one log line (then reminders)."""
        with self._lock:
            self._failed = message
            self.health.failure = message
            self._refresh_locked()

    def check(self) -> None:
        with self._lock:
            warnings: List[str] = []
            for d in self.destinations():
                warnings += check_destination(d, self.min_free_bytes)
            warnings += self.extra_warnings()
            self.health.warnings = warnings
            # A failure met off the hook's path, which the next write will act on: asked anew
            # each time (under continue-degraded a rejoin may leave the node going on).
            self.health.failure = self._failed or self.pending_failure()
            self._refresh_locked()

    def _refresh_locked(self) -> None:
        h = self.health
        h.state = FAILED if h.failure else (WARNING if h.warnings else OK)
        now = time.time()
        for w in h.warnings:
            self._log_once(w, "warn", now)
        if h.failure:
            self._log_once(f"backup FAILED: {h.failure}", "error", now, first_already=True)
        if self.led is not None:
            try:
                self.led.show(h.state)
            except OSError as e:
                self._log_once(self.led.problem(e), "warn", now)
        self._send_status(now)

    def _log_once(self, message: str, level: str, now: float, first_already: bool = False) -> None:
        """Log a persisting problem once, then a reminder every REMINDER_SECONDS. The same
        problem with other numbers in it (free space shrinking by a MiB) is the same problem."""
        key = _NUMBER.sub("#", message)
        last = self._logged.get(key)
        if last is None:
            self._logged[key] = now
            if not first_already:  # the caller has logged it with its context already
                self.log(message, level)
        elif now - last >= REMINDER_SECONDS:
            self._logged[key] = now
            self.log(f"still: {message}", level)

    # --- systemd ---------------------------------------------------------------------
    def status_line(self) -> str:
        h = self.health
        s = self.snapshot()
        if h.failure:
            return f"STATUS=pibackup: FAILED: {h.failure}"[:400]
        parts = [f"pibackup: {h.state if s else 'starting'}"]
        if s.get("data_version") is not None:
            parts.append(f"v{s['data_version']}")
        if s.get("generations") is not None:
            parts.append(f"{s['generations']} generation{'s' if s['generations'] != 1 else ''}")
        if s.get("last_write_age") is not None:
            parts.append(f"last write {int(s['last_write_age'])} s ago")
        if s.get("shipped_age") is not None:
            parts.append(f"shipped {int(s['shipped_age'])} s ago")
        if h.warnings:
            parts.append("WARNING: " + h.warnings[0])
        return ("STATUS=" + ", ".join(parts))[:400]

    def _send_status(self, now: float) -> None:
        if self.notify is None:
            return
        line = self.status_line()
        changed_state = self._last_status is None or self._last_status.split(",")[0] != line.split(",")[0]
        if line == self._last_status or (not changed_state and now - self._last_sent < STATUS_MIN_INTERVAL):
            return
        self.notify(line)
        self._last_status, self._last_sent = line, now

    # --- the monitor thread -------------------------------------------------------------
    def start(self) -> None:
        self.check()
        self._thread = threading.Thread(target=self._loop, name="pibackup-monitor", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception as e:  # the monitor must never take the plugin down
                self.log(f"status monitor: {type(e).__name__}: {e}", "debug")

    def stop(self, restore_led: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.led is not None and restore_led and self.health.failure is None:
            try:
                self.led.restore()
            except OSError:
                pass


def systemd_notifier() -> Optional[Callable[[str], None]]:
    """sd_notify through the sdnotify package, when systemd gave us a socket."""
    if not os.environ.get("NOTIFY_SOCKET"):
        return None
    import sdnotify  # only needed under systemd

    n = sdnotify.SystemdNotifier()
    if n.socket is not None:
        # Never wait for systemd: with its queue full a blocking send would stall the
        # monitor, the status RPC, and a failure report on the hook's path. A dropped
        # STATUS line is replaced by the next one.
        n.socket.setblocking(False)
    return n.notify
