#!/usr/bin/env python3
"""The long run (make bench): N synthetic transactions (default 1,000,000) shaped
like trace A's payments, through the real plugin, with automatic compaction off and with the
defaults (compaction on). The workload applies with foreign keys on and the database grows
as a node's does (workloads.synthetic_growing).

Measured: the hook's round trip (p50, p99, and p99 of the calls made while a compaction
ran), the plugin's peak RSS (VmHWM), and every 200 calls the destination's allocated size
against the live database's size, the largest ratio kept per database size band. The
destination is a plain directory (not a loop device). A last, short run paces the calls at
20 per second (a busy node's rate, not the benchmark's hundreds) to show the small-database
phase when the load does not outrun compaction's start-up. The last row repeats the grown
database's paced run with every core kept busy by a process at lightningd's own priority (a
Pi whose bitcoind validates blocks): compaction's process runs below them (nice +10), so
this row shows how long a compaction takes when it gets only a share of what is left, and
what that does to the bound.

usage: long_run.py [N] [ROWS]   ROWS: which runs, e.g. 1,2,3 (default all: 0,1,2,3,4)
"""

from __future__ import annotations

import os
import subprocess
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

POLL_EVERY = 10  # status is read every 10 calls: reading it after every call doubled the run's time
BANDS = ((0, 1e6, "DB < 1 MB"), (1e6, 4e6, "1-4 MB"), (4e6, float("inf"), "DB >= 4 MB"))


def run(n: int, label: str, options: Dict[str, object], pace: float = 0.0, prefill: int = 0, hogs: int = 0) -> Dict[str, object]:
    """`pace`: calls per second (0: as fast as the plugin answers). `prefill`: synthetic calls
    lightningd commits before pibackup is first started (a node that has grown a database:
    its first start takes a snapshot); then n calls go through the plugin. `hogs`: processes
    spinning at the benchmark's own priority while the n calls are made."""
    prefix, calls = workloads.synthetic_growing(prefill + n)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        dest = root / "usb"
        dest.mkdir()
        node = driver.Node(root / "node", {"pibackup-destination": str(dest), **options})
        node.live.conn.execute("PRAGMA synchronous = OFF")  # lightningd's own durability is not measured here
        node.live.conn.execute("PRAGMA journal_mode = MEMORY")  # nor its rollback journal file: the run is long
        if prefill:
            for r in prefix:
                node.commit_without_plugin(r)
            for _ in range(prefill):
                node.commit_without_plugin(next(calls))
            t0 = time.monotonic()
            node.start([])
        else:
            t0 = time.monotonic()
            node.start([r for r in prefix if r.pre_init])
            node.calls([r for r in prefix if not r.pre_init])
        busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(hogs)]
        during: List[float] = []
        outside: List[float] = []
        running = False
        worst = [0.0 for _ in BANDS]  # destination / DB, the largest seen in each DB size band
        worst_db = [0 for _ in BANDS]
        window: List[float] = []
        seen_runs = 0
        longest = 0.0  # the longest compaction, in seconds
        began = time.monotonic()
        for k, r in enumerate(calls):
            if pace:
                time.sleep(max(0.0, began + k / pace - time.monotonic()))
            node.call(r)
            window.append(node.latencies[-1])
            if len(window) == POLL_EVERY:
                # A window of calls counts as "during" when a compaction ran at its start or
                # end, or started and finished inside it (the run counter moved).
                c = node.rpc("pibackup-status")["compaction"]
                now = isinstance(c, dict) and c["state"] == "running"
                runs = c["runs"] if isinstance(c, dict) else 0
                if isinstance(c, dict) and c.get("last"):
                    longest = max(longest, c["last"]["seconds"])
                (during if running or now or runs != seen_runs else outside).extend(window)
                window, running, seen_runs = [], now, runs
            if k % 200 == 0:
                db = os.path.getsize(node.live.path)
                ratio = allocated(dest) / db
                band = next(i for i, (lo, hi, _) in enumerate(BANDS) if lo <= db < hi)
                if ratio > worst[band]:
                    worst[band], worst_db[band] = ratio, db
            if k and k % 100_000 == 0:
                print(f"  {label}: {k:,} calls, {time.monotonic() - t0:,.0f} s", file=sys.stderr)
        outside.extend(window)
        for h in busy:
            h.kill()
            h.wait()
        st = node.rpc("pibackup-status")
        assert node.plugin is not None
        hwm = hwm_kb(node.plugin.proc.pid)
        node.stop()
        c = st["compaction"]
        return {
            "label": label,
            "calls": len(during) + len(outside),
            "runs": c["runs"] if isinstance(c, dict) else 0,
            "longest": longest,
            "during": during,
            "outside": outside,
            "hwm_mb": hwm / 1024,
            "worst": worst,
            "worst_db": worst_db,
            "db": os.path.getsize(node.live.path),
            "dest": allocated(dest),
            "seconds": time.monotonic() - t0,
        }


def fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}"


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    workloads.byte_compile()
    which = [int(x) for x in sys.argv[2].split(",")] if len(sys.argv) > 2 else [0, 1, 2, 3, 4]
    paced = min(n, 4000)
    runs = [
        lambda: run(n, "compaction off", {"pibackup-compact-ratio": "0"}),
        lambda: run(n, "defaults (compaction on)", {}),
        lambda: run(paced, "defaults, paced at 20 calls/s", {}, pace=20.0),
        # The same rate on a grown database (about 8.5 MB): 24,000 calls, 20 minutes.
        lambda: run(min(n, 24_000), "defaults, paced at 20 calls/s, from a database grown by 200,000 calls", {}, 20.0, 200_000),
        lambda: run(
            min(n, 24_000), f"the same with all {os.cpu_count()} cores kept busy at nice 0", {}, 20.0, 200_000, os.cpu_count() or 1
        ),
    ]
    print(f"\nLong run: {n:,} synthetic transactions (payments shaped like trace A's, a growing database)\n")
    print(
        "| backup | calls | compactions | longest compaction s | p50 ms | p99 ms | p99 outside compaction ms | p99 during compaction ms "
        "| peak RSS MB | "
        + " | ".join(f"max destination / DB, {b[2]}" for b in BANDS)
        + " | final DB MB | final destination MB | wall s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(BANDS) + "---:|---:|---:|")
    for i in which:  # each row as soon as its run ends (the whole takes about an hour)
        r = runs[i]()
        lat = r["during"] + r["outside"]  # type: ignore[operator]
        bands = " | ".join(
            "-" if not w else f"{w:.2f}x (at {db / 1e6:.1f} MB)"
            for w, db in zip(r["worst"], r["worst_db"])  # type: ignore[call-overload]
        )
        print(
            f"| {r['label']} | {r['calls']:,} | {r['runs']} | {r['longest']:.1f} | {fmt(pct(lat, 0.5))} | {fmt(pct(lat, 0.99))} | "
            f"{fmt(pct(r['outside'], 0.99))} | {fmt(pct(r['during'], 0.99))} | {r['hwm_mb']:.1f} | {bands} | "  # type: ignore[arg-type]
            f"{r['db'] / 1e6:.1f} | {r['dest'] / 1e6:.1f} | {r['seconds']:,.0f} |",  # type: ignore[operator]
            flush=True,
        )


if __name__ == "__main__":
    main()
