#!/usr/bin/env python3
"""Replay speed (make bench): pibackup's restore and compaction against the sqlite3
command-line shell executing the same statements in one transaction.

Each recording is replayed through the real plugin (tests/driver.py) into a backup with
every statement kept (no filter), then rebuilt three ways, each timed 5 times (median):
- `sqlite3` shell: `PRAGMA foreign_keys=ON; BEGIN; <every statement>; COMMIT;` into an
  empty file (the process's wall time, start-up included);
- `pibackup restore` (in-process, the CLI's code): reads and inflates the journal, replays
  it, checks the result (integrity and foreign key checks), syncs and renames;
- compaction's snapshot builder (the child process's code, in-process): the same replay
  into a new snapshot, synced and hashed;
and restore once more with one SQL transaction per data_version, for reference.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, List

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import workloads  # noqa: E402,F401  (puts tests/ and the repo on sys.path)
from workloads import driver  # noqa: E402

from pibackup.compaction.child import build_snapshot  # noqa: E402
from pibackup.modes.journal import restore as restore_mod  # noqa: E402
from pibackup.store.directory import Destination  # noqa: E402

RUNS = 5


def timed(fn: Callable[[int], None]) -> float:
    times = []
    for k in range(RUNS):
        t0 = time.perf_counter()
        fn(k)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(name: str) -> List[tuple]:
    rows: List[tuple] = []
    records = driver.load_trace(name)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        dest = root / "usb"
        dest.mkdir()
        # Compaction off: one generation holding every statement, or the restore would replay
        # only what follows a compaction's snapshot and the rows would not compare.
        options = {
            "pibackup-destination": str(dest),
            "pibackup-filter-tables": "none",
            "pibackup-batch-seconds": 0,
            "pibackup-compact-ratio": "0",
        }
        node = driver.Node(root / "node", options)
        driver.run_sessions(node, records)
        node.live.close()
        statements = [w for r in records for w in r.writes]
        sql = root / "all.sql"
        with open(sql, "w", encoding="utf-8") as f:
            f.write("PRAGMA foreign_keys=ON;\nBEGIN;\n")
            for w in statements:
                f.write(w.rstrip().rstrip(";") + ";\n")
            f.write("COMMIT;\n")

        def shell(k: int) -> None:
            with open(sql, "rb") as f:
                subprocess.run(["sqlite3", str(root / f"shell{k}.sqlite3")], stdin=f, check=True)

        def restore(k: int) -> None:
            restore_mod.restore(str(dest), str(root / f"restored{k}.sqlite3"))

        def restore_one_per_version(k: int) -> None:
            saved = restore_mod.REPLAY_BATCH
            restore_mod.REPLAY_BATCH = 1
            try:
                restore_mod.restore(str(dest), str(root / f"single{k}.sqlite3"))
            finally:
                restore_mod.REPLAY_BATCH = saved

        gen = Destination(str(dest)).generations()[-1]

        def compact(k: int) -> None:
            out = root / f"partial{k}"
            out.mkdir()
            build_snapshot(gen, len(gen.segments), str(out))

        base = timed(shell)
        n = len(statements)
        for label, fn in (
            ("sqlite3 shell, one transaction", shell),
            ("pibackup restore (256 per transaction)", restore),
            ("compaction snapshot builder", compact),
            ("pibackup restore, one per data_version", restore_one_per_version),
        ):
            t = base if fn is shell else timed(fn)
            rows.append((name, label, n, t, n / t, 100 * base / t))
    return rows


def main() -> None:
    rows = measure("A") + measure("filler-A")
    print(f"\nReplay speed (median of {RUNS} runs; statements include the {len(rows) // 4} recordings' schema and PRAGMAs)\n")
    print("| recording | replay | statements | seconds | statements/s | of the shell's speed |")
    print("|---|---|---:|---:|---:|---:|")
    for name, label, n, t, rate, pct in rows:
        print(f"| {name} | {label} | {n:,} | {t:.3f} | {rate:,.0f} | {pct:.0f}% |")


if __name__ == "__main__":
    main()
