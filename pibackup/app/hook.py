"""What pibackup does with each message from lightningd, without pyln in the way.

Holds the calls that arrive before init, starts the backup at init, and once anything
has failed answers every later db_write with a refusal so lightningd halts uncommitted.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional

from pibackup.app.config import Config, parse_options
from pibackup.app.livedb import find_live_db
from pibackup.app.modes import MODES
from pibackup.app.recoverfile import NodeFiles
from pibackup.app.shutdown import QUIET_SECONDS, CallGate
from pibackup.app.status import REMINDER_SECONDS, Led, Reporter, StatusError, systemd_notifier
from pibackup.app.traps import start_warnings
from pibackup.errors import PibackupError
from pibackup.fanout.destinations import Destinations
from pibackup.modes.api import Call, Log
from pibackup.rules.replayguard import Unreplayable, check_call
from pibackup.rules.sequence import is_pragma_only

if TYPE_CHECKING:
    from pibackup.copies.schedule import Shipper
    from pibackup.remote.group import RemoteCopies

CONTINUE: Dict[str, Any] = {"result": "continue"}
# Anything but "continue" makes lightningd stop without committing the transaction.
ABORT: Dict[str, Any] = {"result": "abort"}


class HookHandler:
    def __init__(self, log: Log):
        self.log = log
        self.early: List[Call] = []
        self.backup: Optional[Destinations] = None
        self.mode = "journal"
        self.failure: Optional[str] = None
        self.shutting_down = False
        self.reporter: Optional[Reporter] = None
        self.shipper: Optional[Shipper] = None
        self.remotes: Optional[RemoteCopies] = None
        self.node_files: Optional[NodeFiles] = None  # emergency.recover and NODE in each destination
        self.traps: List[str] = []  # set-ups found at start that only warn (app/traps.py)
        self._refusal_logged = 0.0
        self.started = time.time()
        # Held while a call is handled, so leaving at shutdown never cuts one in half.
        self._calls = CallGate()
        self._closing = threading.Lock()
        self._closed = False

    def on_db_write(self, data_version: int, writes: List[str]) -> Dict[str, Any]:
        with self._calls:
            return self._on_db_write(data_version, writes)

    def _on_db_write(self, data_version: int, writes: List[str]) -> Dict[str, Any]:
        if self.failure is not None:
            now = time.time()
            if now - self._refusal_logged >= REMINDER_SECONDS:  # once, then a reminder
                self._refusal_logged = now
                self.log(f"refusing data_version {data_version} so lightningd halts without committing it: {self.failure}", "error")
            return ABORT
        try:
            # Once per call, before anything is answered (early calls too): acknowledged, a
            # call no restore would replay would be lost at the restore that needs it.
            check_call(data_version, writes, is_pragma_only(writes))
        except Unreplayable as e:
            return self._fail(str(e))
        if self.backup is None:
            # Before init the destination is unknown. lightningd commits this call once
            # we answer; until init writes it out, the live DB itself is its only copy
            # (a crash before init shows up as a gap and is repaired from the live DB).
            self.early.append(Call(data_version, list(writes)))
            return CONTINUE
        try:
            self.backup.write(data_version, writes)
            if self.remotes is not None:
                self.remotes.after_write()
        except PibackupError as e:
            return self._fail(str(e))
        except Exception as e:  # a bug must halt the node, never let a write through unbacked
            self.log(traceback.format_exc(), "debug")
            return self._fail(f"internal error ({type(e).__name__}: {e}); please report it")
        return CONTINUE

    def _fail(self, message: str) -> Dict[str, Any]:
        self.failure = message
        if self.backup is not None:
            # Nothing more reaches the medium, not even at exit: the refused transaction
            # may still be pending in the writer, and lightningd never commits it.
            self.backup.failure = message
        self._refusal_logged = time.time()
        self.log(f"pibackup: {message}. lightningd is being halted so nothing unbacked is committed.", "error")
        if self.reporter is not None:
            self.reporter.failed(message)
        return ABORT

    def on_init(self, options: Mapping[str, Any], configuration: Mapping[str, Any]) -> None:
        """Start the backup. Never raises and never disables the plugin: lightningd ignores
        `important-plugin` for a plugin that disables itself, and would go on without us.
        A failure here instead refuses the next db_write, which halts lightningd."""
        backup: Optional[Destinations] = None
        cfg: Optional[Config] = None
        try:
            cfg = parse_options(options)
            self._start_reporter(cfg)
            lightning_dir = str(configuration.get("lightning-dir") or ".")
            live_db = find_live_db(cfg.live_db, lightning_dir)
            self.mode = cfg.mode
            mode, c = MODES[cfg.mode], cfg
            backup = Destinations(
                cfg.destinations or ("",),
                lambda path: mode.make_writer(path, live_db, self.log, c),
                cfg.on_destination_failure,
                self.log,
            )
            backup.start(self.early)
        except Exception as e:
            if isinstance(e, PibackupError):
                self.failure = str(e)
            else:
                self.log(traceback.format_exc(), "debug")
                self.failure = f"internal error at start ({type(e).__name__}: {e}); please report it"
            self.log(f"pibackup cannot back up: {self.failure}. lightningd will be halted at its next database write.", "error")
            self._refusal_logged = time.time()
            if backup is not None:
                backup.close()
            if self.reporter is None:
                self._start_reporter(None)
            assert self.reporter is not None
            self.reporter.failed(self.failure)
            return
        self.early = []
        self.backup = backup
        self.traps = start_warnings(cfg.destinations, live_db, cfg.allow_same_medium, sys.argv[0], lightning_dir)
        self.node_files = NodeFiles(
            lightning_dir, live_db, lambda: [b.destination for b in backup.active], self.log, lambda: self.failure is not None
        )
        self.node_files.start()
        if cfg.ship is not None:
            self._start_shipper(cfg, backup)
        if cfg.remotes:
            from pibackup.remote.group import start_remotes  # only when configured

            self.remotes = start_remotes(cfg.remotes, cfg.destination, backup, self.log)
        if self.reporter is not None:
            self.reporter.check()
        self.log(
            f"backing up {live_db} to {cfg.destination} (data_version {backup.last}, "
            f"{backup.generation and backup.generation.rsplit('/', 1)[-1]})",
            "info",
        )

    def on_shutdown(self, leave: Callable[[int], None] = os._exit) -> None:
        """Flush, then leave on our own once lightningd's last writes are over (app/shutdown.py)."""
        self.shutting_down = True
        self.log(f"lightningd is stopping; still backing up its last writes until none came for {QUIET_SECONDS:g} s", "info")
        with self._calls:
            if self.backup is not None and self.failure is None:
                try:
                    self.backup.flush()
                except PibackupError as e:
                    self._fail(str(e))
        args = (self.close, leave, self.log)
        threading.Thread(target=self._calls.leave_when_quiet, args=args, name="pibackup-shutdown", daemon=True).start()

    def status(self) -> Dict[str, Any]:
        """What `lightning-cli pibackup-status` shows (the status issue extends it)."""
        b = self.backup
        r = self.reporter
        if r is not None:
            r.check()
        state = r.health.state if r is not None else "starting"
        out: Dict[str, Any] = {
            "state": "failed" if self.failure else state,
            "mode": self.mode,
            "uptime_seconds": int(time.time() - self.started),
            "warnings": list(r.health.warnings) if r is not None else [],
            "shipping": self.shipper.status() if self.shipper is not None else "not configured",
            "remote": self.remotes.status() if self.remotes is not None else "not configured",
            "compaction": "none",
        }
        if self.failure or (r is not None and r.health.failure):
            out["failure"] = self.failure or (r.health.failure if r is not None else None)
        if b is None:
            out["calls_before_init"] = len(self.early)
            return out
        out.update(b.status())
        if self.node_files is not None:
            out.update(self.node_files.status())  # node_id, network, emergency_recover
        return out

    def _start_shipper(self, cfg: Config, backup: Destinations) -> None:
        """Shipping runs beside the backup; it can fail without touching it."""
        assert cfg.ship is not None
        path = cfg.destination
        from pibackup.copies.schedule import Shipper  # only when configured (see config.parse_ship)

        shipper = Shipper(cfg.ship, path, lambda: backup.open_segment_of(path), self.log)
        try:
            shipper.start()
        except OSError as e:
            self.log(f"pibackup-ship cannot start: {e.filename or ''}: {e.strerror}; the local backup goes on", "warn")
            return
        self.shipper = shipper
        what = "encrypted " if cfg.ship.key is not None else ""
        self.log(f"shipping an {what}copy to {cfg.ship.target} every {cfg.ship.interval} s".replace("an copy", "a copy"), "info")

    def compact(self) -> Dict[str, Any]:
        """`lightning-cli pibackup-compact`: start a compaction in the background."""
        b = self.backup
        if self.failure is not None:
            return {"compaction": "refused", "reason": self.failure}
        if b is None:
            return {"compaction": "refused", "reason": "the backup has not started yet (no init from lightningd)"}
        # Each destination compacts its own backup.
        answers = {m.destination: m.compact() for m in list(b.active)}
        started = {d: a.outcome for d, a in answers.items()}
        first = next(iter(started.values()), "refused")
        generation = b.generation and b.generation.rsplit("/", 1)[-1]
        out: Dict[str, Any] = {"compaction": first, "destinations": started, "generation": generation}
        reason = next((a.reason for a in answers.values() if a.outcome == "refused" and a.reason), None)
        if reason:
            out["reason"] = reason
        return out

    def _start_reporter(self, cfg: Optional[Config]) -> None:
        """systemd status and the LED; a wrong LED name is a warning, not a reason to halt."""
        led = None
        if cfg is not None and cfg.led:
            try:
                led = Led(cfg.led, cfg.led_dir)
            except StatusError as e:
                self.log(str(e), "warn")
        self.reporter = Reporter(
            self.log,
            self._figures,
            lambda: [b.destination for b in self.backup.active] if self.backup is not None else [],
            extra_warnings=self._extra_warnings,
            pending_failure=lambda: self.backup.pending_failure() if self.backup is not None else None,
            min_free_bytes=cfg.min_free_bytes if cfg is not None else 0,
            led=led,
            notify=systemd_notifier(),
        )
        self.reporter.start()

    def _extra_warnings(self) -> List[str]:
        out = self.backup.warnings() if self.backup is not None else []
        out += self.remotes.warnings() if self.remotes is not None else []
        out += self.node_files.warnings() if self.node_files is not None else []
        # The traps last: they last as long as the set-up, and the status line shows the first warning.
        return out + (self.shipper.warnings() if self.shipper is not None else []) + self.traps

    def _figures(self) -> Dict[str, Any]:
        b = self.backup
        if b is None:
            return {}
        return {
            "data_version": b.last,
            "generations": b.generation_count(),
            "last_write_age": None if b.last_flush is None else time.time() - b.last_flush,
            "shipped_age": None if self.shipper is None else self.shipper.lag(),
        }

    def close(self) -> None:
        with self._closing:  # from the main thread at stdin's end, or from the shutdown thread
            if self._closed:
                return
            self._closed = True
        if self.remotes is not None:
            self.remotes.stop()  # before the backup closes: its open segment stays open remotely too
        if self.shipper is not None:
            self.shipper.stop()
        if self.node_files is not None:
            self.node_files.stop()  # a last look: lightningd may have rewritten emergency.recover at its stop
        if self.reporter is not None:
            self.reporter.stop()
        if self.backup is not None:
            self.backup.close()
