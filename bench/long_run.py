#!/usr/bin/env python3
"""The long run of issue #5 (make bench): N synthetic transactions (default 1,000,000) shaped
like trace A's payments, through the real plugin, with automatic compaction off and with the
defaults (compaction on). The workload applies with foreign keys on and the database grows
as a node's does (workloads.synthetic_growing).

Measured: the hook's round trip (p50, p99, and p99 of the calls made while a compaction
ran), the plugin's peak RSS (VmHWM), and every 200 calls the destination's allocated size
against the live database's size. The destination is a plain directory (not a loop device).

usage: long_run.py [N]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import workloads  # noqa: E402
from compaction import allocated, hwm_kb, pct  # noqa: E402
from workloads import driver  # noqa: E402


def run(n: int, label: str, options: Dict[str, object]) -> Dict[str, object]:
    prefix, calls = workloads.synthetic_growing(n)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        dest = root / "usb"
        dest.mkdir()
        node = driver.Node(root / "node", {"pibackup-destination": str(dest), **options})
        node.live.conn.execute("PRAGMA synchronous = OFF")  # lightningd's own durability is not measured here
        t0 = time.monotonic()
        node.start([r for r in prefix if r.pre_init])
        node.calls([r for r in prefix if not r.pre_init])
        during: List[float] = []
        outside: List[float] = []
        running = False
        worst = 0.0
        worst_at = (0, 0)
        for k, r in enumerate(calls):
            node.call(r)
            (during if running else outside).append(node.latencies[-1])
            c = node.rpc("pibackup-status")["compaction"]
            running = isinstance(c, dict) and c["state"] == "running"
            if k % 200 == 0:
                db = os.path.getsize(node.live.path)
                size = allocated(dest)
                if size / db > worst:
                    worst, worst_at = size / db, (size, db)
            if k and k % 100_000 == 0:
                print(f"  {label}: {k:,} calls, {time.monotonic() - t0:,.0f} s", file=sys.stderr)
        st = node.rpc("pibackup-status")
        assert node.plugin is not None
        hwm = hwm_kb(node.plugin.proc.pid)
        node.stop()
        c = st["compaction"]
        return {
            "label": label,
            "calls": len(during) + len(outside),
            "runs": c["runs"] if isinstance(c, dict) else 0,
            "during": during,
            "outside": outside,
            "hwm_mb": hwm / 1024,
            "worst": worst,
            "worst_at": worst_at,
            "db": os.path.getsize(node.live.path),
            "dest": allocated(dest),
            "seconds": time.monotonic() - t0,
        }


def fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}"


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    rows = [run(n, "compaction off", {"pibackup-compact-ratio": "0"}), run(n, "defaults (compaction on)", {})]
    print(f"\nLong run: {n:,} synthetic transactions (payments shaped like trace A's, a growing database)\n")
    print(
        "| backup | calls | compactions | p50 ms | p99 ms | p99 during compaction ms | peak RSS MB "
        "| max destination / DB | final DB MB | final destination MB | wall s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        lat = r["during"] + r["outside"]  # type: ignore[operator]
        print(
            f"| {r['label']} | {r['calls']:,} | {r['runs']} | {fmt(pct(lat, 0.5))} | {fmt(pct(lat, 0.99))} | "
            f"{fmt(pct(r['during'], 0.99))} | {r['hwm_mb']:.1f} | {r['worst']:.2f}x "  # type: ignore[arg-type]
            f"(at {r['worst_at'][1] / 1e6:.1f} MB) | {r['db'] / 1e6:.1f} | {r['dest'] / 1e6:.1f} | {r['seconds']:,.0f} |"  # type: ignore[index]
        )


if __name__ == "__main__":
    main()
