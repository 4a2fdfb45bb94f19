"""The node's files beside the database, kept in every destination off the hook's path:
lightningd's emergency.recover, copied whenever lightningd rewrites it, and NODE, written
once the node id is known (a brand-new node learns it after the backup began).

A thread looks every few seconds (one stat of emergency.recover; the live database's `vars`
only until the node id is known), and once more at start and at stop.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

from pibackup.errors import PibackupError
from pibackup.store.identity import (
    UNKNOWN,
    Identity,
    IdentityError,
    backup_identity,
    identity_lines,
    identity_of_db,
    read_node_file,
    write_node_file,
)
from pibackup.store.layout import EMERGENCY_RECOVER
from pibackup.store.recover import MAX_SIZE, check_copy, shape_problem, write_copy

Log = Callable[[str, str], None]
CHECK_SECONDS = 5.0
_Stat = Tuple[int, int, int, int]  # st_ino, st_size, st_mtime_ns, st_ctime_ns


def _signature(st: os.stat_result) -> _Stat:
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class NodeFiles:
    """Keeps emergency.recover and NODE in each destination `destinations()` names."""

    def __init__(
        self,
        lightning_dir: str,
        live_db: str,
        destinations: Callable[[], List[str]],
        log: Log,
        halted: Callable[[], bool] = lambda: False,
        interval: float = CHECK_SECONDS,
    ):
        self.source = os.path.join(lightning_dir, EMERGENCY_RECOVER)
        self.live_db = live_db
        self.destinations = destinations
        self.log = log
        self.halted = halted
        self.interval = interval
        self.identity: Identity = UNKNOWN
        self._copied: Dict[str, _Stat] = {}  # destination -> the source as last copied there
        self._recorded: set = set()  # destinations whose NODE is written
        self._problems: Dict[str, str] = {}  # destination -> what failed there (a warning)
        self._source_problem: Optional[str] = None
        self._last_copy: Optional[Dict[str, Any]] = None
        self._lock = threading.Lock()  # one pass at a time (the thread, start, stop)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # --- the thread --------------------------------------------------------------------
    def start(self) -> None:
        self.check()
        self._thread = threading.Thread(target=self._loop, name="pibackup-nodefiles", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception as e:  # never takes the plugin down; the next pass tries again
                self.log(f"emergency.recover and NODE: {type(e).__name__}: {e}", "debug")

    def stop(self) -> None:
        """At the end: one last look, so a file lightningd rewrote at its stop is kept too."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.check()
        except Exception as e:
            self.log(f"emergency.recover and NODE at stop: {type(e).__name__}: {e}", "debug")

    # --- one pass ------------------------------------------------------------------------
    def check(self) -> None:
        with self._lock:
            if self.halted():
                return  # nothing more reaches a medium once a write was refused
            dests = self.destinations()
            if not self.identity.known:
                self._learn_identity()
            for d in dests:
                if self.identity.known and d not in self._recorded:
                    self._record(d)
            self._copy_recover(dests)

    def _learn_identity(self) -> None:
        try:
            self.identity = identity_of_db(self.live_db, at_rest=False, timeout=0.5)
        except IdentityError:
            return  # busy: the next pass asks again

    def _record(self, dest: str) -> None:
        try:
            held = read_node_file(dest)
            if held is None:
                write_node_file(dest, self.identity)
                self.log(f"recorded {self.identity.describe()} in {dest}", "info")
            elif held.conflict(self.identity):
                # The start refused another node's backup; NODE changed since: never overwritten.
                raise IdentityError(f"{dest} says it is the backup of {held.describe()}, not of {self.identity.describe()}")
        except (OSError, PibackupError) as e:
            self._problems[dest] = f"cannot record the node id in {dest}: {getattr(e, 'strerror', None) or e}"
            return
        self._recorded.add(dest)
        self._problems.pop(dest, None)

    def _copy_recover(self, dests: List[str]) -> None:
        try:
            st = os.stat(self.source)
        except FileNotFoundError:
            self._source_problem = None
            return  # lightningd has written none (yet): the copies there are kept as they are
        except OSError as e:
            self._source_problem = f"cannot look at {self.source}: {e.strerror}"
            return
        sig = _signature(st)
        todo = [d for d in dests if self._copied.get(d) != sig]
        if not todo:
            return
        try:
            with open(self.source, "rb") as f:
                read_sig = _signature(os.fstat(f.fileno()))
                data = f.read(MAX_SIZE + 1)
        except FileNotFoundError:
            return  # renamed over meanwhile: the next pass copies the new one
        except OSError as e:
            self._source_problem = f"cannot read {self.source}: {e.strerror}"
            return
        if read_sig != sig:
            return  # replaced while it was read: the next pass copies the new one
        problem = shape_problem(data)
        if problem is not None:
            # lightningd renames a whole file into place, so a short one is not its work.
            self._source_problem = f"{self.source} is not a static channel backup ({problem}); it was not copied"
            return
        self._source_problem = None
        for d in todo:
            try:
                if _holds(d, data):
                    self._copied[d] = sig  # the same bytes: no write, no wear
                    continue
                write_copy(d, data)
            except OSError as e:
                self._problems[d] = f"cannot copy {EMERGENCY_RECOVER} to {d}: {e.strerror}"
                continue
            self._copied[d] = sig
            self._problems.pop(d, None)
            self._last_copy = {"bytes": len(data), "modified": int(st.st_mtime)}
            self.log(f"copied {self.source} ({len(data)} bytes) to {d}", "debug")

    # --- status --------------------------------------------------------------------------
    def warnings(self) -> List[str]:
        out = [w for d, w in sorted(self._problems.items()) if d in self.destinations()]
        return out + ([self._source_problem] if self._source_problem else [])

    def status(self) -> Dict[str, Any]:
        copied = self._last_copy is not None or any(
            os.path.exists(os.path.join(d, EMERGENCY_RECOVER)) for d in self.destinations()
        )
        recover: Dict[str, Any] = {"source": self.source, "in_backup": copied}
        if self._last_copy is not None:
            recover.update(self._last_copy)
        return {**self.identity.as_json(), "emergency_recover": recover}


def _holds(dest: str, data: bytes) -> bool:
    """Does the destination's copy hold exactly `data` already?"""
    path = os.path.join(dest, EMERGENCY_RECOVER)
    try:
        if os.path.getsize(path) != len(data):
            return False
        with open(path, "rb") as f:
            return f.read(len(data) + 1) == data
    except OSError:
        return False


# --- offline: status and verify of a backup directory ----------------------------------------
def describe(backup_dir: str) -> Tuple[List[str], bool, Dict[str, Any]]:
    """What `pibackup status` and `verify` print about the node's files in a backup: its node
    id and network, its emergency.recover. (lines, damaged, the same for --json)."""
    lines, damaged = identity_lines(backup_dir)
    copy, recover_lines, recover_damaged = check_copy(backup_dir)
    try:
        held, _ = backup_identity(backup_dir)
    except IdentityError:
        held = UNKNOWN
    data: Dict[str, Any] = {**held.as_json(), "emergency_recover": None if copy is None else vars(copy)}
    return lines + recover_lines, damaged or recover_damaged, data
