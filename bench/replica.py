#!/usr/bin/env python3
"""The SQLite replica baseline, as lightningd's wallet=sqlite3://main:backup does it: every
transaction committed one by one to a second sqlite3 file, synchronous=FULL, the default
rollback journal, foreign keys on. Prints commit latencies as JSON.

usage: replica.py DB WORKLOAD [N]   (WORKLOAD: a trace name, or "synthetic")
The synthetic calls repeat ids, so there INSERT becomes INSERT OR REPLACE and foreign keys
are off: the point is the I/O a commit costs, not the data."""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workloads  # noqa: E402
from workloads import driver  # noqa: E402


def main() -> None:
    db, workload = sys.argv[1], sys.argv[2]
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA synchronous = FULL")
    latencies = []

    def commit(writes, relaxed=False) -> None:
        if driver.is_pragma_only(writes):
            for w in writes:
                conn.execute(w)
            return
        t0 = time.perf_counter()
        conn.execute("BEGIN")
        for w in writes:
            if relaxed and w.startswith("INSERT INTO"):
                w = "INSERT OR REPLACE INTO" + w[len("INSERT INTO") :]
            try:
                conn.execute(w)
            except sqlite3.IntegrityError:
                if not relaxed:
                    raise
        conn.execute("COMMIT")
        latencies.append(time.perf_counter() - t0)

    if workload == "synthetic":
        prefix, calls = workloads.synthetic(int(sys.argv[3]))
        for r in prefix:
            commit(r.writes)
        conn.execute("PRAGMA foreign_keys = OFF")
        for r in calls:
            commit(r.writes, relaxed=True)
    else:
        for r in driver.load_trace(workload):
            commit(r.writes)
    conn.close()
    json.dump({"latencies": latencies}, sys.stdout)


if __name__ == "__main__":
    main()
