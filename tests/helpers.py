"""Small helpers shared by the tests: restore through the real CLI, snapshot a tree's bytes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import pytest

import dbcompare
import driver
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
        except TimeoutError:
            break
        if until in got[-1]:
            return got
    raise AssertionError(f"no datagram with {until!r}; got {got}")


class Ext4Stick:
    """A loop-mounted ext4 image standing in for a USB stick (root only; skipped otherwise).
    Mounted with errors=remount-ro, as Raspberry Pi OS mounts its file systems."""

    def __init__(self, root: Path, size: str, mkfs: Sequence[str] = ()):
        self.image = root / "stick.img"
        self.mnt = root / "stick"
        self.mnt.mkdir(parents=True)
        if os.geteuid() != 0:
            pytest.skip("loop-mounting an ext4 image needs root")
        subprocess.run(["truncate", "-s", size, str(self.image)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", *mkfs, str(self.image)], check=True, capture_output=True)
        self.mount()

    def mount(self) -> None:
        r = subprocess.run(["mount", "-o", "loop,errors=remount-ro", str(self.image), str(self.mnt)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot loop-mount an ext4 image here: {r.stderr.strip()}")

    @property
    def device(self) -> str:
        r = subprocess.run(["findmnt", "-n", "-o", "SOURCE", str(self.mnt)], capture_output=True, text=True, check=True)
        return r.stdout.strip()

    def kernel_error(self) -> None:
        """What ext4 does on an I/O error with errors=remount-ro: the file system turns read-only."""
        with open(f"/sys/fs/ext4/{os.path.basename(self.device)}/trigger_fs_error", "w") as f:
            f.write("1")

    def unplug(self) -> None:
        """The stick is pulled: the mount disappears from the path at once (lazy unmount)."""
        subprocess.run(["umount", "-l", str(self.mnt)], check=True)

    def repair(self) -> None:
        """Unmount, fsck, mount again: what an owner does with a stick that had errors."""
        subprocess.run(["umount", str(self.mnt)], capture_output=True)
        subprocess.run(["e2fsck", "-fy", str(self.image)], capture_output=True)
        self.mount()

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True)


def assert_nothing_acknowledged_lost(dest: Path, node: driver.Node, tmp_path: Path, name: str, refused: driver.Record) -> None:
    """The restore holds every committed transaction, and nothing else but at most the one
    that was refused: its bytes may have reached the medium before the error (a failed
    sync), as a pending transaction may after a crash. lightningd sends it again first
    thing after its restart, which replaces it (a rewind)."""
    out = tmp_path / f"{name}.sqlite3"
    r = cli("restore", str(dest), str(out))
    assert r.returncode == 0, r.stderr
    if dbcompare.backup_differences(node.live.path, out) == []:
        return
    ahead = tmp_path / f"{name}-live-plus-refused.sqlite3"
    shutil.copyfile(node.live.path, ahead)
    db = driver.LiveDB(ahead)
    db.commit(refused.writes)
    db.close()
    assert dbcompare.backup_differences(ahead, out) == [], "the restore holds more than the one refused transaction"


class LoopStick:
    """A loop-mounted image of one file system a USB stick may carry: ext4, xfs, btrfs, or
    exfat through FUSE (exfat-fuse; this kernel may have no exfat or vfat of its own).
    Root only; skipped when the tools are missing or the mount fails."""

    MKFS = {
        "ext4": ["mkfs.ext4", "-q", "-F"],
        "xfs": ["mkfs.xfs", "-q", "-f"],
        "btrfs": ["mkfs.btrfs", "-q", "-f"],
        "exfat": ["mkfs.exfat"],
    }

    def __init__(self, root: Path, fstype: str, name: str = "stick", size: str = "320M", mnt: Optional[Path] = None):
        if os.geteuid() != 0:
            pytest.skip("loop-mounting a file system image needs root")
        mkfs = self.MKFS[fstype]
        needed = mkfs[0] if fstype != "exfat" else "mount.exfat-fuse"
        for tool in {mkfs[0], needed}:
            if not shutil.which(tool):
                pytest.skip(f"{tool} is not installed (make setup installs xfsprogs, btrfs-progs, exfatprogs, exfat-fuse)")
        self.fstype = fstype
        root.mkdir(parents=True, exist_ok=True)
        self.image = root / f"{name}.img"
        self.mnt = mnt or root / name
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.loop = ""
        subprocess.run(["truncate", "-s", size, str(self.image)], check=True)
        subprocess.run([*mkfs, str(self.image)], check=True, capture_output=True)
        self.mount()

    def mount(self) -> None:
        where = str(self.mnt)
        if self.fstype == "exfat":
            # mount.exfat-fuse wants a block device; umask=077 as a stick for one user is mounted
            losetup = ["losetup", "-f", "--show", str(self.image)]
            self.loop = subprocess.run(losetup, capture_output=True, text=True, check=True).stdout.strip()
            r = subprocess.run(["mount.exfat-fuse", "-o", "umask=077", self.loop, where], capture_output=True, text=True)
        else:
            r = subprocess.run(["mount", "-o", "loop", str(self.image), where], capture_output=True, text=True)
        if r.returncode != 0:
            self._detach()
            pytest.skip(f"cannot mount a {self.fstype} image here: {r.stderr.strip()}")

    def unplug(self) -> None:
        """The stick is pulled: its mount leaves the path at once (lazy unmount)."""
        subprocess.run(["umount", "-l", str(self.mnt)], check=True)

    def _detach(self) -> None:
        if self.loop:
            subprocess.run(["losetup", "-d", self.loop], capture_output=True)  # autoclear once unmounted otherwise
            self.loop = ""

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True)
        self._detach()


def drop_caches() -> None:
    """Make the kernel forget every inode and directory entry nobody holds: file systems that
    invent inode numbers (FAT, exFAT) give the same file another number afterwards."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")
