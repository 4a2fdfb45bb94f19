"""The Transport over the system's rsync and ssh: every command line that reaches another
host is built here, non-interactive and strict about host keys, and its failures explained.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import threading
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from pibackup.copies.target import ShipError, Target
from pibackup.copies.transport import RemoteEntry, run_while_room
from pibackup.store.layout import HEAD, MARKER, TOP_FILES

RSYNC_IO_TIMEOUT = 120  # seconds without progress before rsync gives up
# What a fetch takes from the remote directory: the backup's layout, nothing else (a host
# cannot make a reader store anything of its choosing). Local names are checked again.
_D6 = "[0-9]" * 6
FETCH_FILTERS = [
    f"--include=/{MARKER}",
    f"--include=/{HEAD}",
    *[f"--include=/{name}" for name in TOP_FILES],
    f"--include=/gen-{_D6}/",
    f"--include=/gen-{_D6}/seg-{_D6}.pbj",
    f"--include=/gen-{_D6}/snapshot-v[0-9]*.sqlite3",
    f"--include=/gen-{_D6}/snapshot-v[0-9]*.pbsnap",
    "--exclude=*",
]
_LISTED = re.compile(r"^\S+\s+(\d+)\s+\S+\s+\S+\s+(.+)$")


def ssh_command(cfg_port: int, identity: Optional[str], known_hosts: Optional[str]) -> List[str]:
    """Non-interactive and strict: no password prompts, no unknown host keys accepted."""
    cmd = ["ssh", "-p", str(cfg_port), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"]
    cmd += ["-o", "ConnectTimeout=20", "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4"]
    if known_hosts:
        cmd += ["-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null"]
    if identity:
        cmd += ["-i", identity, "-o", "IdentitiesOnly=yes"]
    return cmd


def rsync_base(port: int, identity: Optional[str], known_hosts: Optional[str]) -> List[str]:
    # rsync splits -e on blanks itself (no shell); the values were checked to hold none.
    return ["rsync", "-e", " ".join(ssh_command(port, identity, known_hosts)), f"--timeout={RSYNC_IO_TIMEOUT}"]


def explain_rsync_failure(code: int, stderr: str, target: Target, port: int, known_hosts: Optional[str]) -> str:
    """One line that says what went wrong and what to do."""
    text = stderr.strip()
    low = text.lower()
    where = f"{target.host} port {port}"
    kh = known_hosts or "~/.ssh/known_hosts"
    if "host key verification failed" in low or "no matching host key" in low:
        return (
            f"ssh does not know {where}'s host key (or it changed): check the host's fingerprint, then add it "
            f"to {kh}, e.g. ssh-keyscan -p {port} {target.host} >> {kh}"
        )
    if "remote host identification has changed" in low:
        return f"the host key of {where} CHANGED: if you did not reinstall that host, someone may be in between; otherwise fix {kh}"
    if "permission denied" in low and ("publickey" in low or "password" in low):
        return (
            f"{target.login} refused our ssh key at {where}: add the public key of pibackup-ship-identity "
            f"to {target.login}'s ~/.ssh/authorized_keys there"
        )
    if "connection refused" in low:
        return f"{where} refuses connections: is sshd running there, and the port right?"
    if "could not resolve" in low or "name or service not known" in low or "temporary failure in name resolution" in low:
        return f"cannot resolve {target.host}: check the name, or the Pi's DNS"
    if "timed out" in low or "no route to host" in low or "network is unreachable" in low or code == 30:
        return f"{where} does not answer (network down or host off); will retry"
    if "no space left" in low or "disk quota" in low:
        return f"the remote host is out of space in {target.path}: free space there (the local backup is unaffected)"
    if "rsync: command not found" in low or "rsync: not found" in low or code == 127:
        return f"rsync is not installed on {target.host}: install it there (apt install rsync)"
    if "read-only file system" in low:
        return f"{target.path} on {target.host} is read-only"
    if "permission denied" in low:
        return f"no permission to write {target.path} on {target.host}: fix its owner or permissions"
    if "no such file or directory" in low and "mkdir" in low:
        return f"the parent directory of {target.path} does not exist on {target.host}: create it"
    if code == 11 and not text:  # rsync sometimes loses the receiver's message as it dies
        return f"file I/O error on {target.host} in {target.path} (rsync code 11): is its disk full or failing?"
    last = text.splitlines()[-1] if text else f"rsync exited with code {code}"
    return f"shipping to {target} failed: {last}"


class RsyncTransport:
    """rsync over ssh to `target`. Calls run one at a time (the shipper's thread, or a
    reader); `stopping` set or cancel() makes the next call raise ShipError("stopping")."""

    def __init__(
        self,
        target: Target,
        port: int,
        identity: Optional[str],
        known_hosts: Optional[str],
        scratch: Optional[str] = None,  # where an empty directory for deletions is made
        stopping: Optional[threading.Event] = None,
    ):
        self.target = target
        self.port = port
        self.identity = identity
        self.known_hosts = known_hosts
        self.scratch = scratch
        self._stopping = stopping or threading.Event()
        self._proc: Optional[subprocess.Popen] = None
        self._proc_lock = threading.Lock()
        self._last_stdout = ""

    def describe(self) -> str:
        return str(self.target)

    def _base(self) -> List[str]:
        return rsync_base(self.port, self.identity, self.known_hosts)

    def _failure(self, code: int, err: str) -> ShipError:
        return ShipError(explain_rsync_failure(code, err, self.target, self.port, self.known_hosts))

    def _run(self, cmd: Sequence[str], stdin: Optional[bytes] = None) -> Tuple[int, str]:
        with self._proc_lock:
            if self._stopping.is_set():
                raise ShipError("stopping")
            self._proc = subprocess.Popen(
                list(cmd),
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,  # a Ctrl-C for lightningd is not one for rsync
            )
        try:
            out, err = self._proc.communicate(stdin)
        finally:
            with self._proc_lock:
                code = self._proc.returncode
                self._proc = None
        self._last_stdout = out.decode(errors="replace")
        return code, err.decode(errors="replace")

    def cancel(self) -> None:
        with self._proc_lock:
            self._stopping.set()
            if self._proc is not None and self._proc.poll() is None:
                self._proc.terminate()

    def list(self, recursive: bool = False) -> Optional[List[RemoteEntry]]:
        if recursive:
            return self._list_layout()
        code, err = self._run(self._base() + ["--list-only", f"{self.target}/"])
        if code == 23 and "no such file or directory" in err.lower():
            return None
        if code != 0:
            raise self._failure(code, err)
        out: Dict[str, RemoteEntry] = {}
        for line in self._last_stdout.splitlines():
            parts = line.split()
            if not parts or parts[-1] == ".":
                continue
            size = parts[1].replace(",", "") if len(parts) >= 5 else ""  # "-rw------- 1,234 date time name"
            out[parts[-1]] = RemoteEntry(parts[-1], int(size) if size.isdigit() else 0, line.startswith("-"))
        return [out[n] for n in sorted(out)]

    def _list_layout(self) -> List[RemoteEntry]:
        cmd = self._base() + ["--recursive", "--no-h", *FETCH_FILTERS, "--list-only", f"{self.target}/"]
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if r.returncode != 0:
            raise self._failure(r.returncode, r.stderr)
        out: List[RemoteEntry] = []
        for line in r.stdout.splitlines():
            m = _LISTED.match(line)
            if m and line.startswith("-"):
                out.append(RemoteEntry(m.group(2), int(m.group(1)), True))
        return out

    def send(self, root: str, rels: Sequence[str], append: bool, growing: bool = False) -> None:
        cmd = self._base() + ["--recursive", "--chmod=D0700,F0600", "--perms", "--files-from=-", "--from0"]
        # --append-verify: send only what the remote copy lacks, then check the whole file.
        # Otherwise the remote has nothing of this copy: always send it (--ignore-times).
        cmd.append("--append-verify" if append else "--ignore-times")
        cmd += [root + "/", f"{self.target}/"]
        code, err = self._run(cmd, stdin=b"\0".join(r.encode() for r in rels))
        if code != 0:
            raise self._failure(code, err)

    def fetch(self, rel: str, into: str, max_bytes: int) -> bool:
        code, _ = self._run(self._base() + [f"--max-size={max_bytes}", f"{self.target}/{rel}", into + "/"])
        return code == 0

    def fetch_copy(self, into: str, max_file: int, still_room: Callable[[], bool]) -> bool:
        cmd = self._base() + ["--recursive", "--no-h", *FETCH_FILTERS, f"--max-size={max_file}", f"{self.target}/", into + "/"]
        done = run_while_room(cmd, still_room)
        if done is None:
            return False
        if done[0] != 0:
            raise self._failure(*done)
        return True

    def delete(self, generations: Sequence[str]) -> None:
        with tempfile.TemporaryDirectory(dir=self.scratch) as empty:
            cmd = self._base() + ["--recursive", "--delete"]
            cmd += [f"--filter=+ /{g}/***" for g in generations] + ["--filter=- *", empty + "/", f"{self.target}/"]
            code, err = self._run(cmd)
        if code != 0:
            raise self._failure(code, err)
