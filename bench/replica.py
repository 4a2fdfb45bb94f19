#!/usr/bin/env python3
"""The SQLite replica baseline, as lightningd's wallet=sqlite3://main:backup does it: every
transaction committed one by one to a second sqlite3 file, synchronous=FULL, the default
rollback journal, foreign keys on. Prints commit latencies as JSON.

usage: replica.py DB WORKLOAD [N]   (WORKLOAD: a trace name, or "synthetic": the growing
synthetic trace of workloads.synthetic_growing, which applies with foreign keys on)"""

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

    def commit(writes) -> None:
        if driver.is_pragma_only(writes):
            for w in writes:
                conn.execute(w)
            return
        t0 = time.perf_counter()
        conn.execute("BEGIN")
        for w in writes:
            conn.execute(w)
        conn.execute("COMMIT")
        latencies.append(time.perf_counter() - t0)

    if workload == "synthetic":
        prefix, calls = workloads.synthetic_growing(int(sys.argv[3]))
        for r in [*prefix, *calls]:
            commit(r.writes)
    else:
        for r in driver.load_trace(workload):
            commit(r.writes)
    conn.close()
    json.dump({"latencies": latencies}, sys.stdout)


if __name__ == "__main__":
    main()
