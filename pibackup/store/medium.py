"""Which mount and which physical disk a path is on: the medium two destinations may share.

Read from /proc/self/mountinfo and sysfs; used by the fan-out's warning and `pibackup check`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional


@dataclass
class Mount:
    point: str
    source: str
    fstype: str
    options: List[str]  # per-mount and per-superblock options together
    dev: str  # "major:minor" as mountinfo gives it


def unescape(s: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    for esc, ch in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        s = s.replace(esc, ch)
    return s


def mount_of(path: str, mountinfo: str = "/proc/self/mountinfo") -> Optional[Mount]:
    """The mount that holds `path`: the longest mount point above it, the last one mounted
    there when several are stacked."""
    real = os.path.realpath(path)
    best: Optional[Mount] = None
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        left, sep, right = line.partition(" - ")
        a, b = left.split(), right.split()
        if not sep or len(a) < 6 or len(b) < 2:
            continue
        point = unescape(a[4])
        if not (real == point or real.startswith(point.rstrip("/") + "/")):
            continue
        if best is None or len(point) >= len(best.point):
            options = list(dict.fromkeys(a[5].split(",") + (b[2].split(",") if len(b) > 2 else [])))
            best = Mount(point, unescape(b[1]), b[0], options, a[2])
    return best


def _whole_disk(major: int, minor: int) -> Optional[str]:
    """The disk a block device belongs to (sda for sda1, mmcblk0 for mmcblk0p2), from sysfs."""
    link = f"/sys/dev/block/{major}:{minor}"
    if not os.path.exists(link):
        return None
    real = os.path.realpath(link)
    if os.path.exists(os.path.join(real, "partition")):
        real = os.path.dirname(real)
    return os.path.basename(real)


def medium(path: str) -> str:
    """A name for the physical medium under `path`: two partitions of one stick, or two btrfs
    subvolumes (each its own st_dev), are one medium. A file system on no block device
    (tmpfs, a network mount) is a medium of its own, named by its st_dev."""
    st = os.stat(path)
    m = mount_of(path)
    candidates = []
    if m is not None and m.source.startswith("/dev/"):
        try:
            src = os.stat(m.source)
            candidates.append((os.major(src.st_rdev), os.minor(src.st_rdev)))
        except OSError:
            pass
    candidates.append((os.major(st.st_dev), os.minor(st.st_dev)))
    for major, minor in candidates:
        disk = _whole_disk(major, minor)
        if disk is not None:
            return disk
    return f"device {os.major(st.st_dev)}:{os.minor(st.st_dev)}"
