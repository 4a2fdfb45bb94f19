"""A real OpenSSH server on 127.0.0.1 for the shipping tests: generated host and user keys,
a non-default port, the real rsync at the other end. Debian's openssh-server and rsync."""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, Optional

import pytest

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "pibackup-test", "-f", str(path)], check=True)
    return (path.with_suffix(".pub") if path.suffix else Path(str(path) + ".pub")).read_text().strip()


class Sshd:
    def __init__(self, root: Path):
        for tool in (SSHD, "rsync", "ssh", "ssh-keygen"):
            if not shutil.which(tool) and not os.path.exists(tool):
                pytest.skip(f"{tool} is not installed (make setup installs openssh-server and rsync)")
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.user = getpass.getuser()
        host_pub = keygen(root / "host_key")
        user_pub = keygen(root / "id_ed25519")
        (root / "authorized_keys").write_text(user_pub + "\n")
        self.identity = str(root / "id_ed25519")
        self.known_hosts = str(root / "known_hosts")
        kind, blob = host_pub.split()[:2]
        Path(self.known_hosts).write_text(f"[127.0.0.1]:{self.port} {kind} {blob}\n")
        self.config = root / "sshd_config"
        self.config.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {root / 'host_key'}",
                    f"AuthorizedKeysFile {root / 'authorized_keys'}",
                    f"PidFile {root / 'sshd.pid'}",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PermitRootLogin prohibit-password",
                    "StrictModes no",
                    "UsePAM no",
                    "LogLevel ERROR",
                    f"AllowUsers {self.user}",
                    "",
                ]
            )
        )
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory
        self.proc: Optional[subprocess.Popen] = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)], stderr=open(self.root / "sshd.log", "ab"))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"sshd exited: {(self.root / 'sshd.log').read_text()}")
                time.sleep(0.05)
        raise RuntimeError("sshd did not start listening")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()
            self.proc = None

    def pause(self) -> None:
        """The host hangs (an unplugged cable): connections open but nothing answers."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def target(self, remote: Path) -> str:
        return f"{self.user}@127.0.0.1:{remote}"

    def options(self, remote: Path, **extra: object) -> Dict[str, object]:
        """pibackup-ship options for lightningd's config."""
        opts: Dict[str, object] = {
            "pibackup-ship": self.target(remote),
            "pibackup-ship-port": self.port,
            "pibackup-ship-identity": self.identity,
            "pibackup-ship-known-hosts": self.known_hosts,
            "pibackup-ship-interval": 1,
        }
        opts.update({k.replace("_", "-"): v for k, v in extra.items()})
        return opts

    def cli_args(self) -> list:
        """The same connection for `pibackup restore/verify HOST:/PATH`."""
        return ["--ssh-port", str(self.port), "--ssh-identity", self.identity, "--known-hosts", self.known_hosts]

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.resume()
            except ProcessLookupError:
                pass
        self.stop()
