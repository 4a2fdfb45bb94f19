"""Small helpers shared by the tests: restore through the real CLI, snapshot a tree's bytes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from driver import REPO


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pibackup", *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def restore_to(dest: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    r = cli("restore", str(dest), str(out), *extra)
    return r


def tree_digest(root: Path) -> Dict[str, str]:
    """Every file under root with its SHA-256: proof that nothing was touched."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def segments(dest: Path) -> List[Path]:
    return sorted(dest.glob("gen-*/seg-*.pbj"))


@contextlib.contextmanager
def tmpfs(mnt: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at mnt (root only; the test is skipped otherwise)."""
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def received(sock: socket.socket, until: str, timeout: float = 10.0) -> list:
    """Datagrams up to the first that contains `until`."""
    got = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got.append(sock.recv(4096).decode())
        except socket.timeout:
            break
        if until in got[-1]:
            return got
    raise AssertionError(f"no datagram with {until!r}; got {got}")
