"""Compare two sqlite3 databases table by table, row by row."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import List, Union

PathLike = Union[str, Path]


def _schema(conn: sqlite3.Connection) -> List[tuple]:
    return sorted(conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'").fetchall())


def _tables(conn: sqlite3.Connection) -> List[str]:
    return [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]


def _rows(conn: sqlite3.Connection, table: str) -> List[tuple]:
    rows = conn.execute(f'SELECT * FROM "{table}"').fetchall()
    return sorted(rows, key=repr)


def differences(a: PathLike, b: PathLike, skip_rows: tuple = ()) -> List[str]:
    """Human-readable differences; empty when equal. Tables in `skip_rows` compare schema only."""
    ca = sqlite3.connect(f"file:{a}?mode=ro", uri=True)
    cb = sqlite3.connect(f"file:{b}?mode=ro", uri=True)
    try:
        out = []
        sa, sb = _schema(ca), _schema(cb)
        if sa != sb:
            only_a = set(sa) - set(sb)
            only_b = set(sb) - set(sa)
            out.append(f"schema differs: only in {a}: {sorted(only_a)[:3]}; only in {b}: {sorted(only_b)[:3]}")
        for t in _tables(ca):
            if t in skip_rows:
                continue
            ra = _rows(ca, t)
            try:
                rb = _rows(cb, t)
            except sqlite3.OperationalError:
                out.append(f"table {t} missing in {b}")
                continue
            if ra != rb:
                missing = len(set(ra) - set(rb))
                extra = len(set(rb) - set(ra))
                out.append(f"table {t}: {len(ra)} vs {len(rb)} rows ({missing} only in first, {extra} only in second)")
        return out
    finally:
        ca.close()
        cb.close()


def row_count(path: PathLike) -> int:
    c = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return sum(c.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in _tables(c))
    finally:
        c.close()


def backup_differences(live: PathLike, restored: PathLike, filtered: tuple = ("utxoset",)) -> List[str]:
    """A restore of a filtered backup: every unfiltered table equal to the live DB, the same
    schema everywhere, the filtered tables empty."""
    out = differences(live, restored, skip_rows=filtered)
    c = sqlite3.connect(f"file:{restored}?mode=ro", uri=True)
    try:
        for t in filtered:
            n = c.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0]
            if n:
                out.append(f"filtered table {t} has {n} rows in {restored}")
    finally:
        c.close()
    return out
