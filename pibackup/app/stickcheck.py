"""`pibackup check DIR`: what the backup medium under DIR is, and whether to trust it.

Mount (mountinfo, fstab), physical medium against the live database's, free space, sync latency.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

from pibackup.store.medium import medium, mount_of, unescape

# File systems that keep no owners or modes and whose rename is not atomic across a power
# cut: docs/guide/sticks.md. fuseblk is what exfat-fuse and ntfs-3g mount as.
FAT_LIKE = {"vfat", "msdos", "fat", "exfat", "fuseblk", "fuse.exfat", "fuse.exfat-fuse"}
# A critical transaction waits for one sync of the stick; see docs/guide/sticks.md for why 50 ms.
SLOW_SYNC_P99_MS = 50.0
SYNC_SAMPLES = 32
SYNC_BLOCK = 4096
# Where lightningd's database usually is: a plain install, RaspiBlitz, Umbrel.
LIVE_DB_GLOBS = (
    "~/.lightning/*/lightningd.sqlite3",
    "/home/bitcoin/.lightning/*/lightningd.sqlite3",
    "/mnt/hdd/app-data/.lightning/*/lightningd.sqlite3",
    "/home/umbrel/umbrel/app-data/core-lightning/data/lightningd/*/lightningd.sqlite3",
)


def fstab_options(point: str, fstab: str = "/etc/fstab") -> Optional[List[str]]:
    """The options of the /etc/fstab line that mounts at `point`, or None without one."""
    try:
        with open(fstab, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 4 and unescape(fields[1]).rstrip("/") == point.rstrip("/"):
            return fields[3].split(",")
    return None


def find_live_db(patterns: Sequence[str] = LIVE_DB_GLOBS) -> Optional[str]:
    for pattern in patterns:
        found = sorted(glob.glob(os.path.expanduser(pattern)))
        if found:
            return found[0]
    return None


def sync_latency(directory: str, samples: int = SYNC_SAMPLES, block: int = SYNC_BLOCK) -> List[float]:
    """Seconds each of `samples` synced writes of `block` bytes took, in a temporary file in
    `directory` removed afterwards: a write and an fdatasync into preallocated space, as the
    journal writer does for each critical transaction."""
    fd, tmp = tempfile.mkstemp(prefix=".pibackup-check-", dir=directory)
    times = []
    try:
        try:
            os.posix_fallocate(fd, 0, samples * block)
        except OSError:
            pass  # FAT and FUSE may not preallocate: the writes extend the file instead
        os.fsync(fd)
        data = os.urandom(block)
        for i in range(samples):
            t = time.perf_counter()
            os.pwrite(fd, data, i * block)
            os.fdatasync(fd)
            times.append(time.perf_counter() - t)
    finally:
        os.close(fd)
        os.unlink(tmp)
    return times


def measure_dir(directory: str) -> str:
    """Where to measure: the parent when it is on the same file system and writable, so no
    file of ours ever appears in a backup directory (a start refuses an empty destination
    that holds a stranger's file, and one could be left by a power cut mid-measure)."""
    parent = os.path.dirname(os.path.abspath(directory).rstrip("/")) or "/"
    try:
        same = os.stat(parent).st_dev == os.stat(directory).st_dev
    except OSError:
        return directory
    return parent if same and os.access(parent, os.W_OK | os.X_OK) else directory


def percentile(values: Sequence[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


@dataclass
class Report:
    directory: str
    facts: Dict[str, object] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


def check(directory: str, live_db: Optional[str] = None, samples: int = SYNC_SAMPLES, fstab: str = "/etc/fstab") -> Report:
    """Look at the medium under `directory`. Raises OSError when it cannot even be measured
    (not a directory, not writable)."""
    if not os.path.isdir(directory):
        raise NotADirectoryError(20, "not a directory (is the stick mounted?)", directory)
    rep = Report(directory)
    m = mount_of(directory)
    fstype = m.fstype if m else "unknown"
    rep.facts.update(
        mount_point=m.point if m else None,
        source=m.source if m else None,
        fs_type=fstype,
        mount_options=m.options if m else [],
        medium=medium(directory),
    )
    if fstype in FAT_LIKE:
        rep.warnings.append(
            f"{directory} is on {fstype}{' (exFAT or NTFS through FUSE)' if fstype == 'fuseblk' else ''} (FAT32 and exFAT "
            "keep no owners or modes, and a rename is not atomic "
            "across a power cut): make the stick ext4 (mkfs.ext4 -L PIBACKUP), see docs/guide/sticks.md"
        )
    if m is not None and "ro" in m.options:
        rep.warnings.append(f"{m.point} is mounted read-only: the backup cannot be written there")
    if m is not None:
        if m.point == "/":
            rep.notes.append(f"{directory} is on the root file system, not on a medium of its own")
        else:
            opts = fstab_options(m.point, fstab)
            rep.facts["fstab_options"] = opts
            if opts is None:
                rep.warnings.append(
                    f"{m.point} has no line in {fstab}: mounted by the desktop or by hand, it is not there at boot "
                    "before lightningd starts; add one (docs/guide/sticks.md)"
                )
            elif "nofail" not in opts:
                rep.warnings.append(
                    f"{fstab}'s line for {m.point} has no nofail: a boot without the stick stops in emergency mode; "
                    "add nofail to its options"
                )
    _compare_live(rep, directory, live_db)
    st = os.statvfs(directory)
    rep.facts["free_bytes"] = st.f_bavail * st.f_frsize
    rep.facts["size_bytes"] = st.f_blocks * st.f_frsize
    where = measure_dir(directory)
    times = sync_latency(where, samples)
    ms = [t * 1000 for t in times]
    rep.facts["sync_ms"] = {
        "in": where,
        "samples": len(ms),
        "p50": round(percentile(ms, 50), 2),
        "p99": round(percentile(ms, 99), 2),
        "max": round(max(ms), 2),
    }
    p99 = percentile(ms, 99)
    if p99 > SLOW_SYNC_P99_MS:
        rep.warnings.append(
            f"a synced 4 KiB write took {p99:.0f} ms (p99) on {directory}, over {SLOW_SYNC_P99_MS:.0f} ms: every critical "
            "transaction (each payment's channel update) waits that long; use a faster stick or an SSD"
        )
    return rep


def _compare_live(rep: Report, directory: str, live_db: Optional[str]) -> None:
    if live_db is None:
        live_db = find_live_db()
        if live_db is None:
            rep.notes.append("lightningd's database not found in the usual places: give --live-db PATH to compare media")
            return
    rep.facts["live_db"] = live_db
    try:
        live_medium = medium(live_db)
    except OSError as e:
        rep.notes.append(f"cannot look at {live_db}: {e.strerror}")
        return
    rep.facts["live_db_medium"] = live_medium
    if live_medium == rep.facts["medium"]:
        rep.warnings.append(
            f"{directory} is on the same medium ({live_medium}) as the live database {live_db}: "
            "one failing card or disk takes both; put the backup on a stick of its own"
        )


def render(rep: Report) -> str:
    f = rep.facts
    sync = f["sync_ms"]
    assert isinstance(sync, dict)
    lines = [
        f"directory:     {rep.directory}",
        f"file system:   {f['fs_type']} on {f['source']}, mounted at {f['mount_point']}",
        f"mount options: {','.join(f['mount_options'])}",  # type: ignore[arg-type]
    ]
    if "fstab_options" in f:
        opts = f["fstab_options"]
        lines.append(f"fstab options: {','.join(opts) if isinstance(opts, list) else 'no line in /etc/fstab'}")
    live = f" (live database: {f['live_db_medium']}, {f['live_db']})" if "live_db_medium" in f else ""
    lines.append(f"medium:        {f['medium']}{live}")
    free, size = int(f["free_bytes"]), int(f["size_bytes"])  # type: ignore[call-overload]
    lines.append(f"free space:    {free // (1 << 20):,} MiB of {size // (1 << 20):,} MiB")
    lines.append(
        f"sync latency:  p50 {sync['p50']:.1f} ms, p99 {sync['p99']:.1f} ms, max {sync['max']:.1f} ms "
        f"({sync['samples']} synced 4 KiB writes in {sync['in']})"
    )
    lines += [f"note: {n}" for n in rep.notes]
    lines += [f"WARNING: {w}" for w in rep.warnings]
    lines.append("verdict:       " + ("fine" if not rep.warnings else f"{len(rep.warnings)} warning(s)"))
    return "\n".join(lines)


def command(directory: str, live_db: Optional[str], as_json: bool) -> int:
    """`pibackup check`: 0 when nothing is wrong, 1 with a warning (read it before trusting
    the stick) or when the directory cannot be measured."""
    try:
        rep = check(directory, live_db)
    except OSError as e:
        print(f"pibackup: error: cannot check {e.filename or directory}: {e.strerror}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps({"directory": rep.directory, **rep.facts, "warnings": rep.warnings, "notes": rep.notes}, indent=2))
    else:
        print(render(rep))
    return 1 if rep.warnings else 0
