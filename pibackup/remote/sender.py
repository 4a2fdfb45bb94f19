"""The sender: one remote copy kept in step with the first local destination over one ssh
session. The hook's path sends the journal bytes a write made durable locally and, for a
critical transaction, waits for the receiver's acknowledgement (given after its fsync);
a background thread connects, catches the receiver up (snapshots, new generations, bulk
frames the local flusher wrote) and records the head, never holding up the hook meanwhile.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Optional

from pibackup import __version__
from pibackup.copies.head import HeadMaker
from pibackup.errors import PibackupError
from pibackup.modes.api import Log
from pibackup.remote.config import HALT, RemoteConfig
from pibackup.remote.link import Link, RemoteError
from pibackup.remote.mirror import Mirror, OpenSegment
from pibackup.remote.protocol import BYE, PROTOCOL_VERSION
from pibackup.remote.record import send_head
from pibackup.store import directory as dst

STATE_DIR = ".remote"  # DEST/.remote: this backup directory's copy id for its remote copies
BACKOFF_FIRST, BACKOFF_MAX = 1.0, 60.0  # seconds between reconnection attempts
ROUND_SECONDS = 1.0  # the background thread's rounds: bulk frames the flusher wrote, the head
HEAD_SECONDS = 10.0  # a new head record at most this often while in step
CATCH_UP_IDLE = 30.0  # at least: a catch-up without a single answer this long (3 timeouts) is stuck


class RemoteCopy:
    """One pibackup-remote target."""

    def __init__(self, cfg: RemoteConfig, source: str, open_segment: OpenSegment, log: Log):
        self.cfg = cfg
        self.source = source
        self.open_segment = open_segment
        self.log = log
        state = os.path.join(source, STATE_DIR)
        os.makedirs(state, mode=0o700, exist_ok=True)
        self.head = HeadMaker(source, state, cfg.key)
        self.mirror = Mirror(source, cfg.key, lambda gen: self.head.binding(generation(source, gen)))
        self.link: Optional[Link] = None
        self.connected = False  # the receiver answered HELLO on the current session
        self.in_step = False  # the receiver holds every file up to the open segment: the hook may append
        self.problem: Optional[str] = None  # why the remote is not in step (down, refused), for status and the hook
        self.degraded_since: Optional[float] = None
        self.in_step_since: Optional[float] = None
        self.last_ack: Optional[float] = None
        self._open_rel: Optional[str] = None
        self._lock = threading.RLock()  # the mirror and the link: the hook and the thread take turns
        self._wake = threading.Event()
        self._back = threading.Condition()
        self._stop = threading.Event()
        self._head_sent = 0.0
        self._early = threading.local()  # .seq: the APPEND sent by early() in this thread's flush
        self._thread = threading.Thread(target=self._run, name="pibackup-remote", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # --- the hook's path ---------------------------------------------------------------
    def push(self, critical: bool) -> Optional[int]:
        """Send what this write made durable locally; the sequence number to wait for when
        `critical` (None: nothing to wait for). Never waits for the network itself."""
        # This call's own early send only: an earlier call's ack says nothing about these bytes.
        early, self._early.seq = getattr(self._early, "seq", None), None
        if not self.in_step:
            self._wake.set()
            link = self.link
            if self.connected and link is not None and link.stalled() > idle(self.cfg):
                return self._broken(f"no answer for {link.stalled():.0f} s while catching up: a hung host?", critical)
            if not critical or self.cfg.on_failure != HALT or self.connected:
                return None  # down under continue-degraded, or a new generation on its way: not waited for
            if not self._wait_in_step(self.cfg.timeout):
                raise RemoteError(halt_message(self.cfg, self.problem or f"no session within {self.cfg.timeout:g} s"))
        if not self._lock.acquire(timeout=self.cfg.timeout):
            return self._broken("its session is busy beyond pibackup-remote-timeout", critical)
        try:
            link = self.link
            if link is None or not self.in_step:
                if critical and self.cfg.on_failure == HALT and not self.connected:
                    raise RemoteError(halt_message(self.cfg, self.problem or "the session ended"))
                return None
            seg = self.open_segment()
            if seg is not None and self.mirror.continues(seg[0], self._open_rel):
                # The common case: the same open segment, grown. No listing on the hook's path.
                if early is not None and self.mirror.holds(seg[0], seg[1]):
                    return early if critical else None  # sent while the local sync ran
                return self.mirror.append_open(link, seg[0], seg[1], critical)
            files = self.mirror.inventory(self.open_segment)
            segs = [f for f in files if not f.whole]
            if segs and segs[-1].rel != self._open_rel:
                # A roll-over: the closed segment's last bytes and the new one's header go now.
                self._open_rel = segs[-1].rel
            if self.mirror.send(link, files, whole_files=False) is not None:
                self.in_step = False  # a new generation: its snapshot goes in the background
                self._wake.set()
                return None
            if not critical:
                return None
            self.mirror.sync_last(link, files)
            return link.sent
        except RemoteError as e:
            return self._broken(str(e), critical)
        except OSError as e:
            return self._broken(f"reading the local backup: {e}", critical)
        finally:
            self._lock.release()

    def early(self, path: str, offset: int, data: bytes) -> None:
        """A flush's bytes, written locally, not yet synced (store/writer.py's observer): sent
        now with a sync, so the round trip runs beside the local sync; push() waits for it.
        In step only (a crash in between: Mirror._checked)."""
        if not self.in_step or not self._lock.acquire(blocking=False):
            return
        try:
            link = self.link
            if link is not None and self.in_step and self.mirror.early(link, path, offset, data, self._open_rel):
                self._early.seq = link.sent
        except (RemoteError, OSError) as e:
            self._broken(str(e), False)
        finally:
            self._lock.release()

    def wait(self, seq: int) -> None:
        link = self.link
        try:
            if link is None:
                raise RemoteError("the session ended")
            link.wait(seq, self.cfg.timeout)
            self.last_ack = time.time()
        except RemoteError as e:
            self._broken(str(e), True)

    def _broken(self, why: str, critical: bool) -> Optional[int]:
        """The session cannot be trusted any more: closed, and caught up again from scratch."""
        with self._back:
            self.in_step = self.connected = False
            first = self.problem is None
            self.problem = why = short(self.cfg, why)
            if self.degraded_since is None:
                self.degraded_since = time.time()
            if self.link is not None:
                self.link.abort(why)
        self._wake.set()
        if critical and self.cfg.on_failure == HALT:
            raise RemoteError(halt_message(self.cfg, why))
        if first:
            self.log(
                f"pibackup: remote copy {self.cfg.target} is not in step ({why}); the node goes on with the local backup "
                "(pibackup-remote-on-failure=continue-degraded) and catches the remote up once it answers again",
                "error",
            )
        return None

    def _wait_in_step(self, timeout: float) -> bool:
        with self._back:
            return self._back.wait_for(lambda: self.in_step or self._stop.is_set(), timeout) and self.in_step

    # --- the background thread ---------------------------------------------------------------
    def _run(self) -> None:
        backoff = BACKOFF_FIRST
        while not self._stop.is_set():
            try:
                if self.link is None or self.link.failure is not None:
                    self._reconnect()
                    backoff = BACKOFF_FIRST
                else:
                    self._round()
            except (RemoteError, OSError, PibackupError) as e:
                why = short(self.cfg, str(e)) if not isinstance(e, OSError) else f"reading the local backup: {e}"
                self._drop_link()
                if self.problem != why:
                    self.log(f"pibackup: remote copy {self.cfg.target}: {why}; retrying in {backoff:.0f} s", "warn")
                with self._back:
                    self.problem = why
                    if self.degraded_since is None:
                        self.degraded_since = time.time()
                    self._back.notify_all()
                self._stop.wait(backoff)
                backoff = min(BACKOFF_MAX, backoff * 2)
                continue
            self._wake.wait(ROUND_SECONDS)
            self._wake.clear()

    def _reconnect(self) -> None:
        self._drop_link()
        link = Link(self.cfg)
        self.link = link
        gens = dst.Destination(self.source).generations()
        node = self.head.node_id(gens[-1] if gens else None)
        welcome = link.hello(
            {
                "protocol": PROTOCOL_VERSION,
                "version": __version__,
                "copy_id": self.head.copy_id.hex(),
                "node_id": "" if not any(node) else node.hex(),
                "encrypted": self.cfg.key is not None,
            }
        )
        self.connected = True
        with self._lock:
            self.mirror.load(welcome.get("files") or {})
            if self.degraded_since is not None:
                since = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.degraded_since))
                self._send_head(link, f"degraded (this copy not in step since {since}; catching it up)")
            self._catch_up(link)

    def _catch_up(self, link: Link) -> None:
        """Everything the receiver lacks, synced there; then the hook's transactions wait for it again."""
        files = self.mirror.inventory(self.open_segment)
        self.mirror.send(link, files, whole_files=True)
        self.mirror.sync_last(link, files)
        link.wait_progress(link.sent, idle(self.cfg))
        segs = [f for f in files if not f.whole]
        self._open_rel = segs[-1].rel if segs else None
        with self._back:
            was = self.problem
            self.in_step, self.problem, self.degraded_since = True, None, None
            self.in_step_since = self.last_ack = time.time()
            self._back.notify_all()
        self._send_head(link, "in step")
        if was is not None:
            self.log(f"pibackup: remote copy {self.cfg.target} is caught up and in step again", "info")

    def _round(self) -> None:
        link = self.link
        assert link is not None
        with self._lock:
            if not self.in_step:
                self._catch_up(link)
                return
            files = self.mirror.inventory(self.open_segment)
            if self.mirror.send(link, files, whole_files=False) is not None:
                self.in_step = False
                self._catch_up(link)
                return
            self.mirror.send(link, files, whole_files=True)  # advances the open segment's walk
            if time.time() - self._head_sent >= HEAD_SECONDS:
                self._send_head(link, "in step")

    def _send_head(self, link: Link, state: str) -> None:
        self._head_sent = time.time()
        send_head(link, self.head, self.mirror, self.source, state)

    def _drop_link(self) -> None:
        with self._back:
            link, self.link = self.link, None
            self.in_step = self.connected = False
        if link is not None:
            link.close(wait=0.5)

    # --- stop ----------------------------------------------------------------------------------
    def stop(self) -> None:
        """At the end: what is left goes out, the head says the sender stopped, then BYE."""
        if self._lock.acquire(timeout=self.cfg.timeout):
            link = self.link
            if link is not None and link.failure is None and self.in_step:
                try:
                    files = self.mirror.inventory(self.open_segment)
                    self.mirror.send(link, files, whole_files=False)
                    self.mirror.sync_last(link, files)
                    self._send_head(link, "in step until it stopped")
                    link.send(BYE, {})
                    link.wait(link.sent, self.cfg.timeout)
                except (RemoteError, OSError):
                    pass
            self._lock.release()
        self._stop.set()
        self._wake.set()
        with self._back:
            self._back.notify_all()
        self._thread.join(timeout=10)
        self._drop_link()


def generation(source: str, name: str) -> Optional[dst.Generation]:
    return next((g for g in dst.Destination(source).generations() if g.name == name), None)


def idle(cfg: RemoteConfig) -> float:
    return max(CATCH_UP_IDLE, 3 * cfg.timeout)


def halt_message(cfg: RemoteConfig, why: str) -> str:
    return f"remote copy {cfg.target} cannot take this critical transaction: {short(cfg, why)}"


def short(cfg: RemoteConfig, why: str) -> str:
    """The session's messages name the remote already: not twice after our own prefix."""
    prefix = f"remote {cfg.target}"
    return why[len(prefix) :].lstrip(": ") if why.startswith(prefix) else why
