"""Which statements pibackup drops (filtered tables) and which transactions are critical.

Decided per statement from its SQL text alone, in the hook: no database access.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import FrozenSet, Iterable, List, Optional, Sequence, Tuple

from pibackup.errors import PibackupError

# Tables whose rows may be dropped from the backup, with the reason. Only tables that
# lightningd can rebuild from the block chain and that no other table's rows depend on.
FILTERABLE = {
    "utxoset": "Core Lightning's copy of P2WSH outputs seen on chain, kept for gossip "
    "verification; rebuilt by rescanning blocks; no other table references it",
}
DEFAULT_FILTER: Tuple[str, ...] = ("utxoset",)

# Tables of chain bookkeeping: the node re-derives them from the chain (blocks it processes
# again). A transaction that writes only these (and the vars below) is "bulk".
BULK_TABLES = frozenset({"blocks", "utxoset"})
BULK_VARS = frozenset({"last_processed_block"})

_LITERAL = re.compile(r"'(?:[^']|'')*'")
_HEAD = re.compile(
    r"""\s*(?:
        (?P<insert>INSERT(?:\s+OR\s+\w+)?\s+INTO|REPLACE\s+INTO)\s+"?(?P<t1>\w+)
      | (?P<update>UPDATE(?:\s+OR\s+\w+)?)\s+"?(?P<t2>\w+)
      | (?P<delete>DELETE\s+FROM)\s+"?(?P<t3>\w+)
    )""",
    re.IGNORECASE | re.VERBOSE,
)
_DDL = re.compile(r"\s*(CREATE|ALTER|DROP)\b", re.IGNORECASE)
_TRIGGER = re.compile(r"\s*CREATE\s+(?:TEMP\w*\s+)?TRIGGER\b", re.IGNORECASE)
_PRAGMA = re.compile(r"\s*PRAGMA\b", re.IGNORECASE)
_VARS_NAME = re.compile(r"""name\s*=\s*'([^']*)'|VALUES\s*\(\s*'([^']*)'""", re.IGNORECASE)
_DATA_VERSION_BUMP = re.compile(r"\s*UPDATE\s+vars\s+SET\s+intval\s*=\s*intval\s*\+\s*1\s+WHERE\s+name\s*=\s*'data_version'", re.I)


class FilterError(PibackupError):
    """A statement the filter cannot drop or keep safely."""


def parse_filter(value: Optional[str]) -> FrozenSet[str]:
    """`pibackup-filter-tables`: comma-separated table names, or `none`."""
    if value is None:
        return frozenset(DEFAULT_FILTER)
    v = value.strip().lower()
    if v in ("none", ""):
        return frozenset()
    names = [n.strip() for n in v.split(",") if n.strip()]
    for n in names:
        if n not in FILTERABLE:
            allowed = ", ".join(sorted(FILTERABLE))
            raise FilterError(
                f"pibackup-filter-tables: {n!r} cannot be filtered: it holds state lightningd cannot rebuild "
                f"from the chain, or other tables depend on its rows. Tables that can be: {allowed} (or none)"
            )
    return frozenset(names)


@dataclass(frozen=True)
class Classified:
    writes: List[str]  # what is journaled
    critical: bool  # must be durable before lightningd may commit
    dropped: int  # statements left out by the filter


def _target(stmt: str) -> Optional[str]:
    m = _HEAD.match(stmt)
    if not m:
        return None
    return (m.group("t1") or m.group("t2") or m.group("t3")).lower()


def _vars_key(stmt: str) -> Optional[str]:
    m = _VARS_NAME.search(stmt)
    return (m.group(1) or m.group(2)) if m else None


def classify(writes: Sequence[str], filtered: Iterable[str]) -> Classified:
    """Drop statements on filtered tables and decide whether the transaction is critical.

    Critical unless every statement is chain bookkeeping (BULK_TABLES, BULK_VARS, the
    data_version bump): unknown tables, DDL and PRAGMAs are critical.
    """
    filtered = frozenset(filtered)
    kept: List[str] = []
    critical = False
    dropped = 0
    for stmt in writes:
        if _PRAGMA.match(stmt) or _DDL.match(stmt):
            if filtered and _TRIGGER.match(stmt) and _mentions(stmt, filtered):
                raise FilterError(
                    f"a trigger involving a filtered table appeared ({stmt[:120]!r}); pibackup cannot filter it safely: "
                    "set pibackup-filter-tables=none and restart lightningd"
                )
            kept.append(stmt)
            critical = True
            continue
        table = _target(stmt)
        if table is None:
            kept.append(stmt)
            critical = True
            continue
        if table in filtered:
            dropped += 1
            continue
        # The hot path: the identifier scan runs only when a filtered name occurs at all.
        if filtered and any(t in stmt.lower() for t in filtered):
            reads = _identifiers(stmt) & filtered
            if reads:
                raise FilterError(
                    f"a statement on {table} reads the filtered table {sorted(reads)[0]} "
                    f"({stmt[:120]!r}); its result would differ in the backup. Set pibackup-filter-tables=none "
                    "and restart lightningd"
                )
        kept.append(stmt)
        if table == "vars":
            if _DATA_VERSION_BUMP.match(stmt) or _vars_key(stmt) in BULK_VARS:
                continue
            critical = True
        elif table not in BULK_TABLES:
            critical = True
    return Classified(kept, critical, dropped)


def _identifiers(stmt: str) -> FrozenSet[str]:
    """Every word of the statement outside string literals (a filtered table's name among
    them means the statement reads it: FROM, JOIN, comma joins, subqueries alike)."""
    return frozenset(re.findall(r"\w+", _LITERAL.sub("''", stmt).lower()))


def _mentions(stmt: str, tables: FrozenSet[str]) -> bool:
    return bool(_identifiers(stmt) & tables)
