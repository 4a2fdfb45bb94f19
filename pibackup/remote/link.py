"""One long-lived ssh session to a receiver: the system's ssh run with an argument list,
strict about host keys, its stdin and stdout carrying the protocol, its failures explained.
"""

from __future__ import annotations

import subprocess
import threading
import time
from typing import Any, BinaryIO, Dict, List, Optional

from pibackup.copies.rsync import explain_rsync_failure, ssh_command
from pibackup.errors import PibackupError
from pibackup.remote.config import RemoteConfig
from pibackup.remote.protocol import (
    ACK,
    ERROR,
    HELLO,
    PROTOCOL_VERSION,
    WELCOME,
    Message,
    PeerClosed,
    ProtocolError,
    encode,
    read_message,
)


class RemoteError(PibackupError):
    """The remote cannot be reached or refused something; the message names the host and the cause."""


def explain(cfg: RemoteConfig, code: Optional[int], stderr: str) -> str:
    low = stderr.lower()
    where = f"{cfg.target.host} port {cfg.port}"
    if code == 127 or "command not found" in low or ("no such file or directory" in low and cfg.command[0] in stderr):
        return (
            f"{cfg.command[0]} is not installed on {cfg.target.host} (or not on its PATH): install the pibackup .deb "
            "there, or set pibackup-remote-command to its full path"
        )
    text = explain_rsync_failure(code if code is not None else 255, stderr, cfg.target, cfg.port, cfg.known_hosts)
    text = text.replace("pibackup-ship", "pibackup-remote").replace("rsync exited with code", "ssh exited with code")
    if text.startswith("shipping to "):
        text = f"the session with {where} ended: {stderr.strip().splitlines()[-1] if stderr.strip() else 'no message'}"
    return text


class Link:
    """The ssh process and a thread reading the receiver's answers. send() returns the
    message's sequence number at once; wait() blocks until that message was answered."""

    def __init__(self, cfg: RemoteConfig):
        self.cfg = cfg
        cmd = ssh_command(cfg.port, cfg.identity, cfg.known_hosts) + ["-T", "--", cfg.target.login, *cfg.remote_command()]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None and self.proc.stderr is not None
        self._in: BinaryIO = self.proc.stdin  # type: ignore[assignment]
        self._out: BinaryIO = self.proc.stdout  # type: ignore[assignment]
        self._seq = 0
        self._answered = 0
        self._progress = time.monotonic()  # the last answer, or the first message sent with none outstanding
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()
        self.failure: Optional[str] = None  # the first thing that broke the session
        self.welcome: Dict[str, Any] = {}
        self._stderr: List[bytes] = []
        self._errt = threading.Thread(target=self._read_stderr, name="pibackup-remote-err", daemon=True)
        self._errt.start()
        self._reader: Optional[threading.Thread] = None

    # --- start --------------------------------------------------------------------------
    def hello(self, meta: Dict[str, Any]) -> Dict[str, Any]:
        seq = self.send(HELLO, meta)
        try:
            m = read_message(self._out)
        except PeerClosed:
            raise RemoteError(self._ended("the connection closed before the receiver answered")) from None
        except ProtocolError as e:
            what = self.cfg.command[0]
            raise RemoteError(f"{self._where()}: the receiver's answer is not the protocol ({e}); is {what} pibackup's?") from e
        if m.type == ERROR:
            raise RemoteError(f"{self._where()} refused: {m.meta.get('error')}")
        if m.type != WELCOME or m.seq != seq:
            raise RemoteError(f"{self._where()}: answered HELLO with {m.name}")
        if m.meta.get("protocol") != PROTOCOL_VERSION:
            raise RemoteError(
                f"{self._where()}: protocol version mismatch: the receiver (pibackup {m.meta.get('version')}) speaks "
                f"{m.meta.get('protocol')}, this pibackup {PROTOCOL_VERSION}; install the same pibackup release on both hosts"
            )
        self._answered = seq
        self.welcome = m.meta
        self._reader = threading.Thread(target=self._read_answers, name="pibackup-remote-acks", daemon=True)
        self._reader.start()
        return m.meta

    # --- messages -----------------------------------------------------------------------
    def send(self, mtype: int, meta: Dict[str, Any], data: bytes = b"") -> int:
        with self._send_lock:
            if self.failure is not None:
                raise RemoteError(self.failure)
            if self._answered == self._seq:
                self._progress = time.monotonic()  # nothing was outstanding: the clock starts now
            self._seq += 1
            seq = self._seq
            try:
                self._in.write(encode(Message(mtype, seq, meta, data)))
                self._in.flush()
            except (BrokenPipeError, OSError, ValueError):
                self._fail(self._ended("the connection broke while sending"))
                raise RemoteError(self.failure or "the connection broke") from None
            return seq

    def wait(self, seq: int, timeout: float) -> None:
        """Until message `seq` was acknowledged; RemoteError when refused, broken or too slow."""
        with self._cond:
            ok = self._cond.wait_for(lambda: self._answered >= seq or self.failure is not None, timeout)
            if self._answered >= seq:
                return
            if not ok:
                raise RemoteError(
                    f"{self._where()} did not acknowledge within {timeout:g} s (pibackup-remote-timeout): a hung host or a slow link?"
                )
            raise RemoteError(self.failure or "the connection broke")

    def stalled(self) -> float:
        """Seconds without an answer while messages are outstanding (0 when none are)."""
        return 0.0 if self._answered >= self._seq else time.monotonic() - self._progress

    def wait_progress(self, seq: int, idle: float) -> None:
        """Until message `seq` was acknowledged, however long that takes while answers keep
        coming (a snapshot over a slow link); RemoteError after `idle` seconds without one."""
        while True:
            try:
                return self.wait(seq, idle)
            except RemoteError:
                if self.failure is not None or self.stalled() >= idle:
                    raise

    def abort(self, why: str) -> None:
        """Give up the session now: also a thread blocked writing to it (a full pipe to a
        hung host) gets an error instead of waiting for ever."""
        self._fail(why)
        if self.proc.poll() is None:
            self.proc.kill()

    @property
    def answered(self) -> int:
        return self._answered

    @property
    def sent(self) -> int:
        return self._seq

    def _read_answers(self) -> None:
        while True:
            try:
                m = read_message(self._out)
            except PeerClosed:
                self._fail(self._ended("the receiver closed the connection"))
                return
            except (ProtocolError, OSError, ValueError) as e:
                self._fail(f"{self._where()}: broken answer from the receiver ({e})")
                return
            if m.type == ERROR:
                self._fail(f"{self._where()} refused: {m.meta.get('error')}")
                return
            if m.type != ACK or m.seq != self._answered + 1:
                self._fail(f"{self._where()}: expected the answer to message {self._answered + 1}, got {m.name} {m.seq}")
                return
            with self._cond:
                self._answered = m.seq
                self._progress = time.monotonic()
                self._cond.notify_all()

    def _fail(self, why: str) -> None:
        with self._cond:
            if self.failure is None:
                self.failure = why
            self._cond.notify_all()

    def _where(self) -> str:
        return f"remote {self.cfg.target}"

    def _ended(self, what: str) -> str:
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        self._errt.join(timeout=2)
        err = b"".join(self._stderr).decode("utf-8", "replace")
        return f"{self._where()}: {explain(self.cfg, code, err) if (err.strip() or code) else what}"

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        total = 0
        for line in self.proc.stderr:
            if total < 16384:  # ssh's and the receiver's messages; never unbounded
                self._stderr.append(line)
                total += len(line)

    def close(self, wait: float = 5.0) -> None:
        if self.failure is not None and self.proc.poll() is None:
            self.proc.kill()  # a broken session: nothing more to say, and a full pipe must not block the close
        try:
            self._in.close()
        except (OSError, ValueError):
            pass
        try:
            self.proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._fail("closed")
