"""The benchmark's workloads: the real recordings, and a long synthetic trace built from
trace A's real statement shapes (its payments, over and over, with fresh random blobs)."""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import driver  # noqa: E402
from driver import Record  # noqa: E402

_BUMP = re.compile(r"\s*UPDATE vars SET intval = intval \+ 1 WHERE name = 'data_version'")
_BLOB = re.compile(r"x'([0-9a-fA-F]*)'")
_DDL = re.compile(r"\s*(CREATE|ALTER|DROP|PRAGMA)\b", re.I)


def byte_compile() -> None:
    """Write the plugin's .pyc files first, as the Debian package does when it is installed.
    Without them (PYTHONDONTWRITEBYTECODE is set on the development machine) every start of
    the plugin compiles its sources, which adds about 1.4 MB to its peak RSS that an
    installed plugin never pays, while pyln-client's come compiled by pip."""
    import compileall

    compileall.compile_dir(str(Path(__file__).resolve().parents[1] / "pibackup"), quiet=1)


def synthetic(n: int, seed: int = 1, start: Optional[int] = None) -> Tuple[List[Record], Iterator[Record]]:
    """(prefix, calls): the prefix is trace A's first run, replayed for real so the live DB
    exists; then n calls shaped like A's after its channel opened. Blobs (signatures,
    hashes, onions: most of the bytes, and random in reality) are fresh random bytes of the
    same length; integers and text repeat, so the stream is a little kinder to compression
    than a real node's. `start`: the data_version the calls follow (trace A's by default)."""
    records = driver.load_trace("A")
    prefix = driver.first_run(records)
    templates = [r for r in prefix[len(prefix) // 3 :] if not r.pre_init and not any(_DDL.match(w) for w in r.writes)]
    start = prefix[-1].data_version if start is None else start

    def calls() -> Iterator[Record]:
        rng = random.Random(seed)
        for k in range(n):
            t = templates[k % len(templates)]
            v = start + 1 + k
            writes = []
            for w in t.writes:
                if _BUMP.match(w):
                    writes.append(f"UPDATE vars SET intval = intval + 1 WHERE name = 'data_version' AND intval = {v - 1}")
                else:
                    writes.append(_BLOB.sub(lambda m: "x'" + rng.randbytes(len(m.group(1)) // 2).hex() + "'", w))
            yield Record(0, False, v, tuple(writes))

    return prefix, calls()


_GROW_INSERT = re.compile(r"^(\s*INSERT INTO (?:payments|channel_htlcs|channel_moves)\b[^)]*\)\s*VALUES\s*\(\s*)(\d+)", re.I | re.S)
_GROW_UPDATE = re.compile(r"^(\s*UPDATE channel_htlcs\b.*\bWHERE id\s*=\s*)(\d+)", re.I | re.S)
_INSERT = re.compile(r"^\s*INSERT INTO\b", re.I)


def synthetic_growing(n: int, seed: int = 1, start: Optional[int] = None, id_base: int = 0) -> Tuple[List[Record], Iterator[Record]]:
    """Like synthetic(), but every call applies to the database with foreign keys on, and the
    database grows as a node's does: each payment adds its payments, channel_htlcs and
    channel_moves rows under fresh ids (the template's id plus 100,000 per round through
    the templates). Other inserts become INSERT OR REPLACE, so rows that only move along a
    channel's state (anchors, penalty bases) are replaced instead of repeated. `id_base` is
    added to every new id (a database that already holds rows under the template's ids)."""
    prefix, base = synthetic(n, seed, start)

    def calls() -> Iterator[Record]:
        records = driver.load_trace("A")
        first = driver.first_run(records)
        period = len([r for r in first[len(first) // 3 :] if not r.pre_init and not any(_DDL.match(w) for w in r.writes)])
        for k, r in enumerate(base):
            off = id_base + 100_000 * (k // period)
            writes = []
            for w in r.writes:
                if off:
                    w = _GROW_INSERT.sub(lambda m, o=off: m.group(1) + str(int(m.group(2)) + o), w, count=1)
                    w = _GROW_UPDATE.sub(lambda m, o=off: m.group(1) + str(int(m.group(2)) + o), w, count=1)
                if _INSERT.match(w):
                    w = "INSERT OR REPLACE INTO" + w.lstrip()[len("INSERT INTO") :]
                writes.append(w)
            yield Record(r.seq, r.pre_init, r.data_version, tuple(writes))

    return prefix, calls()
