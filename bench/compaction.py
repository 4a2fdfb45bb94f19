#!/usr/bin/env python3
"""Compaction benchmark (make bench): the hook's latency, the plugin's peak RSS and the
destination's size with compaction off, with compaction running again and again, and in
replica mode (pibackup-mode=replica).

Each recording is replayed through the real plugin (tests/driver.py), defaults except:
"off" sets pibackup-compact-ratio=0 (never automatic); "on" sets ratio 0.05 and
pibackup-compact-min-kb=64, so a compaction starts whenever 64 KiB of journal has built up,
which keeps one running for much of the replay. After every call the driver asks
pibackup-status whether a compaction is running; the next call's round trip counts as
"during compaction" when one is. The destination is measured after every call (allocated
blocks of every file under it) against the live database's size at that moment.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import workloads  # noqa: E402  (also puts tests/ and the repo on sys.path)
from workloads import driver  # noqa: E402


def allocated(root: Path) -> int:
    total = 0
    for d, _, files in os.walk(root):
        for f in files:
            try:
                total += os.stat(os.path.join(d, f)).st_blocks * 512
            except OSError:
                pass  # deleted meanwhile by retention
    return total


def pct(values: List[float], q: float) -> Optional[float]:
    if not values:
        return None
    s = sorted(values)
    return 1000 * s[min(len(s) - 1, int(q * len(s)))]


def hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def run(name: str, options: Dict[str, object]) -> Dict[str, object]:
    records = driver.load_trace(name)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        dest = root / "usb"
        dest.mkdir()
        node = driver.Node(root / "node", {"pibackup-destination": str(dest), **options})
        during: List[float] = []
        outside: List[float] = []
        worst = 0.0
        running = False
        hwm = 0
        runs = 0

        def after_call(n: driver.Node) -> None:
            nonlocal running, worst
            (during if running else outside).append(n.latencies[-1])
            c = n.rpc("pibackup-status")["compaction"]  # a string before init
            running = isinstance(c, dict) and c["state"] == "running"
            db = os.path.getsize(n.live.path)
            if db:
                worst = max(worst, allocated(dest) / db)

        def before_stop(n: driver.Node) -> None:
            nonlocal hwm, runs
            assert n.plugin is not None
            hwm = max(hwm, hwm_kb(n.plugin.proc.pid))
            c = n.rpc("pibackup-status")["compaction"]
            runs += c["runs"] if isinstance(c, dict) else 0

        orig_call = node.call

        def call(r: driver.Record) -> None:
            orig_call(r)
            if node.plugin is not None:
                after_call(node)

        node.call = call  # type: ignore[method-assign]
        driver.run_sessions(node, records, before_stop=before_stop)
        node.live.close()
        return {
            "calls": len(during) + len(outside),
            "runs": runs,
            "during": during,
            "outside": outside,
            "hwm_mb": hwm / 1024,
            "worst": worst,
            "final_db": os.path.getsize(node.live.path),
        }


def main() -> None:
    rows = []
    workloads.byte_compile()
    for name in ("A", "filler-A"):
        off = run(name, {"pibackup-compact-ratio": "0"})
        on = run(name, {"pibackup-compact-ratio": "0.05", "pibackup-compact-min-kb": 64})
        replica = run(name, {"pibackup-mode": "replica"})
        rows.append((name, "journal, compaction off", off))
        rows.append((name, "journal, compaction every 64 KiB", on))
        rows.append((name, "replica mode", replica))
    print("\nCompaction: hook round trip, plugin peak RSS, destination size (allocated) / live DB size\n")
    print(
        "| recording | backup | calls | compactions | calls during one | p50 ms | p99 ms | p99 during ms "
        "| peak RSS MB | max destination / DB |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, label, r in rows:
        all_lat = r["during"] + r["outside"]  # type: ignore[operator]
        p99d = pct(r["during"], 0.99)  # type: ignore[arg-type]
        print(
            f"| {name} | {label} | {r['calls']:,} | {r['runs']} | {len(r['during']):,} | {pct(all_lat, 0.5):.2f} | "  # type: ignore[arg-type]
            f"{pct(all_lat, 0.99):.2f} | {'-' if p99d is None else f'{p99d:.2f}'} | {r['hwm_mb']:.1f} | {r['worst']:.2f}x |"
        )


if __name__ == "__main__":
    main()
