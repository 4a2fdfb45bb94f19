"""Compressed snapshots (pibackup/store/snapfile.py, FORMAT.md "Compressed snapshot"): they
give back the database byte for byte, carry unchanged chunks, and every kind of damage is
found before anything read from them is used."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

import pytest

from pibackup.errors import DamageError
from pibackup.store import snapfile

NODE = bytes([2]) + b"N" * 32
GENESIS = b"G" * 32


def make_db(path: Path, rows: int, seed: int = 1) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, blob BLOB, note TEXT)")
    import random

    rng = random.Random(seed)
    conn.executemany("INSERT INTO t VALUES (?, ?, ?)", [(i, rng.randbytes(200), f"row {i}") for i in range(rows)])
    conn.commit()
    conn.close()


def sha(p: Path) -> bytes:
    return hashlib.sha256(p.read_bytes()).digest()


def test_a_compressed_snapshot_expands_to_the_same_bytes_and_carries_its_unchanged_chunks(tmp_path):
    db = tmp_path / "db.sqlite3"
    make_db(db, 20_000)
    first = tmp_path / "snapshot-v1.pbsnap"
    w1 = snapfile.write_compressed(str(db), str(first), 1, (NODE, GENESIS))
    assert w1.sha256 == sha(first) and w1.size == first.stat().st_size < db.stat().st_size
    assert w1.chunks == -(-db.stat().st_size // snapfile.CHUNK) and w1.carried == 0
    out = tmp_path / "out.sqlite3"
    snapfile.expand(str(first), str(out), w1.sha256)
    assert out.read_bytes() == db.read_bytes() and os.stat(out).st_mode & 0o777 == 0o600
    h = snapfile.read_header(str(first))
    assert (h.node_id, h.genesis_hash, h.data_version, h.database_bytes) == (NODE, GENESIS, 1, db.stat().st_size)
    # A few rows change at the end: most chunks are carried as they were stored.
    conn = sqlite3.connect(db)
    conn.execute("UPDATE t SET note = 'changed' WHERE id > 19990")
    conn.commit()
    conn.close()
    second = tmp_path / "snapshot-v2.pbsnap"
    w2 = snapfile.write_compressed(str(db), str(second), 2, (NODE, GENESIS), previous=str(first))
    assert 0 < w2.carried < w2.chunks and w2.chunks - w2.carried <= 3
    snapfile.expand(str(second), str(out := tmp_path / "out2.sqlite3"), w2.sha256)
    assert out.read_bytes() == db.read_bytes()
    # From a plain (format 1) snapshot nothing is carried, and the result is the same file.
    plain = tmp_path / "snapshot-v2.sqlite3"
    plain.write_bytes(db.read_bytes())
    third = tmp_path / "third.pbsnap"
    w3 = snapfile.write_compressed(str(db), str(third), 2, (NODE, GENESIS), previous=str(plain))
    assert w3.carried == 0 and third.read_bytes() == second.read_bytes()
    assert b"".join(snapfile.plain_chunks(str(plain), sha(plain))) == db.read_bytes()


@pytest.mark.parametrize("where", ["header", "record", "chunk", "trailer", "cut", "appended", "version"])
def test_every_damage_to_a_compressed_snapshot_is_found(tmp_path, where):
    db = tmp_path / "db.sqlite3"
    make_db(db, 5_000)
    snap = tmp_path / "snapshot-v1.pbsnap"
    snapfile.write_compressed(str(db), str(snap), 1, (b"", b""))
    data = bytearray(snap.read_bytes())
    rec = snapfile.HEADER_SIZE
    if where == "header":
        data[40] ^= 1
    elif where == "record":
        data[rec + 12] ^= 1  # the chunk's hash
    elif where == "chunk":
        data[rec + 40 + 100] ^= 0x10
    elif where == "trailer":
        data[-1] ^= 1
    elif where == "cut":
        del data[len(data) // 2 :]
    elif where == "appended":
        data += b"\0" * 7
    elif where == "version":
        data[9] = 2
    snap.write_bytes(bytes(data))
    message = "written by another release" if where == "version" else "snapshot is damaged"
    for inflate in (True, False):
        if where in ("record", "chunk") and not inflate:
            continue  # found by the SHA-256 (below), or by inflating
        with pytest.raises(DamageError, match=message):
            snapfile.check(str(snap), None, inflate=inflate)
    if where != "version":
        with pytest.raises(DamageError, match="snapshot is damaged"):
            snapfile.check(str(snap), hashlib.sha256(b"").digest())
    with pytest.raises(DamageError):
        snapfile.expand(str(snap), str(tmp_path / f"out-{where}"), None)


def test_a_whole_file_that_is_not_the_journal_s_is_damage(tmp_path):
    db = tmp_path / "db.sqlite3"
    make_db(db, 100)
    snap = tmp_path / "snapshot-v1.pbsnap"
    snapfile.write_compressed(str(db), str(snap), 1, (b"", b""))
    with pytest.raises(DamageError, match="SHA-256 does not match"):
        snapfile.check(str(snap), b"\0" * 32)
    assert snapfile.read_header(str(snap)).node_id == bytes(33)  # a database without the rows yet
