"""Compressed snapshots through the plugin: a compaction of a generation whose snapshot is
compressed carries the chunks the journal did not change as they were stored, and every
generation restores; the newest equal to the database lightningd has."""

from __future__ import annotations

import os
import time

import dbcompare
import driver
from helpers import cli, restore_to
from pibackup.store import snapfile


def wait_compacted(node: driver.Node, runs: int) -> None:
    for _ in range(1200):  # the limit only keeps a broken build from hanging the suite
        c = node.rpc("pibackup-status")["compaction"]
        assert c["state"] != "failed", c
        if c["runs"] >= runs and c["state"] == "idle":
            return
        time.sleep(0.05)
    raise AssertionError(f"compaction did not finish: {c}")


def records(path) -> list:
    out = []
    for chunk in snapfile.carried_chunks(str(path), snapfile.CHUNK):
        if chunk is None:
            return out
        out.append(chunk)
    raise AssertionError("unreachable")


def test_a_compaction_carries_unchanged_chunks_and_every_generation_restores(make_node, traces, dest, tmp_path):
    recs = driver.first_run(traces["A"])
    node = make_node(pibackup_compact_ratio="0", pibackup_keep_generations="3")
    for r in recs[:300]:
        node.commit_without_plugin(r)  # an existing node: the first start takes a snapshot
    # Rows the journal never touches, as a routing node's years of forwards: their chunks
    # are the ones a compaction carries.
    node.live.conn.execute("CREATE TABLE history (id INTEGER PRIMARY KEY, blob BLOB)")
    node.live.conn.executemany("INSERT INTO history (blob) VALUES (?)", [(os.urandom(300),) for _ in range(8000)])
    node.start(recs[300:302])
    node.calls(recs[302:500])
    assert node.rpc("pibackup-compact")["compaction"] == "started"
    wait_compacted(node, 1)
    node.calls(recs[500:700])
    assert node.rpc("pibackup-compact")["compaction"] == "started"
    wait_compacted(node, 2)
    node.calls(recs[700:])
    node.stop()
    snaps = [next((dest / g).glob("snapshot-v*")) for g in ("gen-000001", "gen-000002", "gen-000003")]
    assert all(s.name.endswith(".pbsnap") and s.read_bytes()[:8] == b"PIBKSNAP" for s in snaps)
    before, after = records(snaps[1]), records(snaps[2])
    same = sum(1 for a, b in zip(before, after, strict=False) if a == b)  # same hash and the very bytes stored
    assert len(after) > 30 and len(after) // 2 < same < len(after), (same, len(after))
    header = snapfile.read_header(str(snaps[2]))
    live = node.live.conn.execute("SELECT blobval FROM vars WHERE name = 'node_id'").fetchone()[0]
    assert header.node_id == live
    for generation in ("1", "2", "3"):
        out = tmp_path / f"gen{generation}.sqlite3"
        r = restore_to(dest, out, "--generation", generation)
        assert r.returncode == 0, r.stderr  # an older generation ends where the next one began
    assert dbcompare.backup_differences(node.live.path, out) == []  # the newest: all lightningd has
    v = cli("verify", str(dest))
    assert v.returncode == 0, v.stdout + v.stderr
