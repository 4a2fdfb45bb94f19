"""Statements, bytes and syncs journaled with and without the utxoset filter and the tiers,
on the real recordings, through the real plugin process. Prints a table."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import driver  # noqa: E402

MODES = [
    ("none", 0),
    ("utxoset", 0),
    ("none", 30),
    ("utxoset", 30),
]


def run(trace: str, records, filter_tables: str, batch_seconds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dest = root / "usb"
        dest.mkdir()
        node = driver.Node(
            root,
            {
                "pibackup-destination": str(dest),
                "pibackup-filter-tables": filter_tables,
                "pibackup-batch-seconds": batch_seconds,
            },
        )
        totals: dict = {}

        def collect(n: driver.Node) -> None:
            for k, v in n.rpc("pibackup-status")["counters"].items():
                totals[k] = totals.get(k, 0) + v

        driver.run_sessions(node, records, before_stop=collect)
        node.live.close()
        return totals


def main() -> None:
    rows = []
    for trace in driver.trace_names():
        records = driver.load_trace(trace)
        statements = sum(len(r.writes) for r in records)
        for filt, batch in MODES:
            t = run(trace, records, filt, batch)
            tx = len(records)
            rows.append(
                (
                    trace,
                    filt,
                    "on" if batch else "off",
                    tx,
                    statements - t["statements_dropped"],
                    t["bytes_written"],
                    t["syncs"],
                    1000 * t["syncs"] / tx,
                    t["bulk_frames"],
                )
            )
    head = ("trace", "filter", "tiers", "calls", "statements journaled", "bytes written", "syncs", "syncs/1000 tx", "bulk calls")
    widths = [
        max(len(str(x)) for x in col) for col in zip(head, *[[f"{c:.0f}" if isinstance(c, float) else c for c in r] for r in rows])
    ]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for r in rows:
        cells = [f"{c:.0f}" if isinstance(c, float) else str(c) for c in r]
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)))


if __name__ == "__main__":
    main()
