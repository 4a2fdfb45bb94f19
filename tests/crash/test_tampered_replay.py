"""A backup altered on the medium (checksums recomputed with pibackup's own writer) cannot
make restore, verify, the compaction process or the replica run SQL lightningd never writes:
no file is created or opened outside, the statement is reported as damage at its place, and
nothing acknowledged is lost. Restored databases and snapshots are private to their owner.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import time
from pathlib import Path
from typing import Callable, List, Tuple

import pytest

import dbcompare
import driver
from helpers import cli, restore_to
from pibackup.rules.replayguard import Refused, check_statement, connect
from pibackup.store.output import copy_snapshot
from pibackup.store.reader import SegmentReader, scan_segment
from pibackup.store.segment import KIND_PRAGMA, KIND_TX, Frame, encode_statements
from pibackup.store.snapshot import sha256_file, take_snapshot
from pibackup.store.writer import SegmentWriter

V = 40  # the data_version whose frame is tampered with
NewFrames = Callable[[Frame, Path], List[Tuple[int, int, List[str]]]]


def journal_node(make_node: Callable[..., driver.Node], recs: List[driver.Record], n: int) -> driver.Node:
    """A node whose backup holds the first `n` calls in one segment, every table kept."""
    node = make_node(pibackup_compact_ratio="0", pibackup_segment_size="64M", pibackup_filter_tables="none")
    early = [r for r in recs if r.pre_init]
    node.start(early)
    node.calls(recs[len(early) : n])
    return node


def insert_after(seg: Path, version: int, new: NewFrames, outside: Path) -> int:
    """Rewrite a segment with pibackup's writer, adding `new` frames right after the TX frame
    of `version`, as someone with write access to the medium could. Returns the offset of
    the first added frame."""
    with SegmentReader(str(seg)) as r:
        header = r.header
        frames = list(r.frames())
    tmp = str(seg) + ".new"
    w = SegmentWriter.create(tmp, header, 0)
    at = -1
    for f in frames:
        w.add(f.kind, f.data_version, f.statements)
        if f.kind == KIND_TX and f.data_version == version:
            w.flush()
            at = w.size
            for kind, v, statements in new(f, outside):
                w.add(kind, v, statements)
    w.flush()
    w.close()
    os.replace(tmp, seg)
    assert at > 0
    assert any(f.offset == at for f in scan_segment(str(seg)).frames)
    return at


def pragma_attach(tx: Frame, outside: Path) -> List[Tuple[int, int, List[str]]]:
    return [(KIND_PRAGMA, tx.data_version, [f"ATTACH DATABASE '{outside}/pwn.db' AS p", "CREATE TABLE p.t(x)"])]


def tx_commit_attach_vacuum(tx: Frame, outside: Path) -> List[Tuple[int, int, List[str]]]:
    # A rewind of the transaction (same data_version) with statements slipped in.
    evil = ["COMMIT", f"ATTACH DATABASE '{outside}/pwn2.db' AS p", "CREATE TABLE p.t(x)", f"VACUUM INTO '{outside}/pwn3.db'", "BEGIN"]
    return [(KIND_TX, tx.data_version, tx.statements[:-1] + evil + tx.statements[-1:])]


def reference_at(recs: List[driver.Record], version: int, path: Path) -> Path:
    ref = driver.LiveDB(path)
    for r in recs:
        if r.data_version > version:
            break
        ref.commit(r.writes)
    ref.close()
    return path


@pytest.mark.parametrize(
    "tamper,kind", [(pragma_attach, "ATTACH DATABASE"), (tx_commit_attach_vacuum, "COMMIT")], ids=["pragma-frame", "tx-frame"]
)
def test_a_tampered_frame_is_damage_for_verify_and_restore_and_creates_no_file(tamper, kind, traces, make_node, dest, tmp_path):
    recs = driver.first_run(traces["A"])[:120]
    node = journal_node(make_node, recs, 120)
    node.stop()
    outside = tmp_path / "x"
    outside.mkdir()
    seg = dest / "gen-000001" / "seg-000001.pbj"
    at = insert_after(seg, V, tamper, outside)
    place = f"{seg} offset {at}: data_version {V}: refused {kind} statement"

    v = cli("verify", str(dest))
    assert v.returncode == 1 and "DAMAGED" in v.stdout and place in v.stdout, v.stdout
    out = tmp_path / "restored.sqlite3"
    r = restore_to(dest, out)
    assert r.returncode == 1 and place in r.stderr, r.stderr
    assert not out.exists() and not Path(str(out) + ".pibackup-tmp").exists()
    # --partial: everything before the refused frame, exactly.
    r = restore_to(dest, out, "--partial")
    assert r.returncode == 1 and place in r.stderr and f"restored only up to data_version {V}" in r.stderr, r.stderr
    assert dbcompare.backup_differences(reference_at(recs, V, tmp_path / "ref.sqlite3"), out, ()) == []
    assert list(outside.iterdir()) == []


def test_a_statement_only_the_authorizer_refuses_stops_a_partial_restore_just_before_it(traces, make_node, dest, tmp_path):
    # An UPDATE (the static check lets it through) whose subquery is a recursive CTE (one that
    # never ends would hang the restore): refused while it is replayed, at its frame. The
    # transaction that held it is undone alone: --partial ends at the one before.
    recs = driver.first_run(traces["A"])[:120]
    node = journal_node(make_node, recs, 120)
    node.stop()
    seg = dest / "gen-000001" / "seg-000001.pbj"
    recursive = (
        "UPDATE vars SET val = (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 3) "
        "SELECT count(*) FROM c) WHERE name = 'x'"
    )
    check_statement(recursive)
    at = insert_after(seg, V, lambda tx, _: [(KIND_TX, tx.data_version, [*tx.statements, recursive])], tmp_path)
    out = tmp_path / "restored.sqlite3"
    r = restore_to(dest, out)
    place = f"{seg} offset {at}: data_version {V}: refused UPDATE statement: it asks for"
    assert r.returncode == 1 and place in r.stderr, r.stderr
    assert not out.exists()
    r = restore_to(dest, out, "--partial")
    assert r.returncode == 1 and place in r.stderr and f"restored only up to data_version {V - 1}" in r.stderr, r.stderr
    assert dbcompare.backup_differences(reference_at(recs, V - 1, tmp_path / "ref.sqlite3"), out, ()) == []


def test_the_compaction_process_refuses_a_tampered_generation_and_it_is_replaced_from_the_live_db(traces, make_node, dest, tmp_path):
    recs = driver.first_run(traces["A"])[:160]
    node = journal_node(make_node, recs, 120)
    node.stop()
    outside = tmp_path / "x"
    outside.mkdir()
    seg = dest / "gen-000001" / "seg-000001.pbj"
    at = insert_after(seg, V, tx_commit_attach_vacuum, outside)
    node.start([])
    node.calls(recs[120:140])
    assert node.rpc("pibackup-compact")["compaction"] == "started"
    for _ in range(1200):  # never a time limit on the outcome: only against a hang
        c = node.rpc("pibackup-status")["compaction"]
        if c["state"] == "failed":
            break
        time.sleep(0.05)
    assert c["state"] == "failed" and f"{seg} offset {at}" in c["error"] and "refused COMMIT statement" in c["error"], c
    node.calls(recs[140:160])  # the next write starts a new generation from the live database
    assert "replacing the damaged gen-000001" in node.log_text(), node.log_text()
    node.stop()
    assert list(outside.iterdir()) == []
    out = tmp_path / "restored.sqlite3"
    r = restore_to(dest, out)
    assert r.returncode == 0, r.stderr
    assert dbcompare.backup_differences(node.live.path, out, ()) == []  # nothing acknowledged lost
    v = cli("verify", str(dest))
    assert v.returncode == 1 and f"{seg} offset {at}" in v.stdout, v.stdout


# --- replica mode ------------------------------------------------------------------------------
def replica_file(dest: Path) -> Path:
    return sorted(dest.glob("replica-*/replica.sqlite3"))[-1]


def tamper_pending(replica: Path, outside: Path) -> None:
    c = sqlite3.connect(replica, timeout=10, isolation_level=None)
    try:
        (pending,) = c.execute("SELECT pending FROM pibackup_replica").fetchone()
        assert pending is not None
        evil = [f"ATTACH DATABASE '{outside}/pwn.db' AS p", "CREATE TABLE p.t(x)"]
        c.execute("UPDATE pibackup_replica SET pending = ?", (encode_statements(evil),))
    finally:
        c.close()


def test_tampered_pending_statements_of_a_replica_are_refused_by_verify_restore_and_start(traces, make_node, dest, tmp_path):
    recs = driver.first_run(traces["A"])[:100]
    node = make_node(pibackup_mode="replica", pibackup_filter_tables="none")
    early = [r for r in recs if r.pre_init]
    node.start(early)
    node.calls(recs[len(early) : 60])
    node.kill()  # the last call stays pending in the replica
    outside = tmp_path / "x"
    outside.mkdir()
    replica = replica_file(dest)
    tamper_pending(replica, outside)
    place = f"{replica}: pending transaction data_version {recs[59].data_version}: refused ATTACH DATABASE statement"

    v = cli("verify", str(dest))
    assert v.returncode == 1 and "DAMAGED" in v.stdout and place in v.stdout, v.stdout
    out = tmp_path / "restored.sqlite3"
    r = restore_to(dest, out)
    assert r.returncode == 1 and place in r.stderr, r.stderr
    assert not out.exists()
    # lightningd starts again: its first call would apply the pending transaction. The replica
    # is set aside instead, and a new one is built from the live database.
    node.start([recs[60]])
    node.calls(recs[61:80])
    assert place in node.log_text() and list(dest.glob("replica-*.damaged")), node.log_text()
    node.stop()
    assert list(outside.iterdir()) == []
    r = restore_to(dest, out)
    assert r.returncode == 0, r.stderr
    assert dbcompare.backup_differences(node.live.path, out, ()) == []


def test_pending_statements_tampered_with_while_the_replica_runs_are_refused_and_nothing_is_lost(traces, make_node, dest, tmp_path):
    recs = driver.first_run(traces["A"])[:100]
    node = make_node(pibackup_mode="replica", pibackup_filter_tables="none")
    early = [r for r in recs if r.pre_init]
    node.start(early)
    node.calls(recs[len(early) : 60])
    outside = tmp_path / "x"
    outside.mkdir()
    replica = replica_file(dest)
    tamper_pending(replica, outside)  # between two calls, through a second connection
    node.calls(recs[60:100])  # the first of them applies the pending transaction: refused
    assert "refused ATTACH DATABASE statement" in node.log_text(), node.log_text()
    assert list(dest.glob("replica-*.damaged"))
    node.stop()
    assert list(outside.iterdir()) == []
    out = tmp_path / "restored.sqlite3"
    r = restore_to(dest, out)
    assert r.returncode == 0, r.stderr
    assert dbcompare.backup_differences(node.live.path, out, ()) == []


# --- the guard itself ------------------------------------------------------------------------
def test_every_recorded_statement_passes_the_static_check(traces):
    checked = 0
    for records in traces.values():
        for r in records:
            for w in r.writes:
                check_statement(w, driver.is_pragma_only(r.writes))
                checked += 1
    assert checked > 18_000  # both recordings, every statement (9,472 + 9,251)


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO t VALUES ('a;b'); ATTACH 'x' AS y",
        "INSERT INTO t VALUES (1) /* ; */; VACUUM",
        "CREATE TRIGGER t AFTER INSERT ON v BEGIN SELECT 1; END; ATTACH 'x' AS y",
        "INSERT INTO temp.t VALUES (1)",
        'CREATE TABLE "p".t (x)',
        "CREATE TEMP TABLE t (x)",
        "CREATE VIEW v AS SELECT 1",
        "SAVEPOINT s",
        "PRAGMA writable_schema = ON",
        "INSERT INTO t VALUES ('never closed;'); ATTACH 'x' AS y",
    ],
)
def test_the_static_check_refuses(statement):
    with pytest.raises(Refused):
        check_statement(statement)


def test_a_statement_prepared_for_the_replayer_is_never_reused_for_a_journalled_one(tmp_path):
    # Python caches compiled statements by their text, and SQLite asks the authorizer only
    # when it compiles one: a COMMIT compiled for the replayer must not run unchecked when a
    # frame says COMMIT too.
    c = connect(str(tmp_path / "db.sqlite3"), isolation_level=None)
    try:
        for _ in range(3):
            c.execute("BEGIN")
            c.execute("CREATE TABLE IF NOT EXISTS t (x)")
            with pytest.raises(Refused):
                c.replay("COMMIT")
            c.execute("COMMIT")
        with pytest.raises(sqlite3.Error):
            c.execute(f"ATTACH DATABASE '{tmp_path}/pwn.db' AS p")  # not even for the replayer
    finally:
        c.close()
    assert not (tmp_path / "pwn.db").exists()


# --- file modes ------------------------------------------------------------------------------
@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_restored_databases_and_snapshots_are_private_and_force_keeps_the_mode(umask022, traces, make_node, dest, tmp_path):
    recs = driver.first_run(traces["A"])[:80]
    node = journal_node(make_node, recs, 80)
    node.stop()
    out = tmp_path / "restored.sqlite3"
    assert restore_to(dest, out).returncode == 0
    assert mode(out) == 0o600
    # --force onto an existing database: the file keeps its mode (and owner, as root).
    out.chmod(0o640)
    owner = (1234, 1234) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    os.chown(out, *owner)
    r = restore_to(dest, out, "--force")
    assert r.returncode == 0, r.stderr
    assert mode(out) == 0o640 and (out.stat().st_uid, out.stat().st_gid) == owner
    # Snapshots: of the live database, and compaction's copy of one.
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    path, _, sha = take_snapshot(str(node.live.path), str(snaps))
    assert mode(Path(path)) == 0o600
    copy_snapshot(path, str(snaps / "copy.sqlite3"), sha256_file(path))
    assert mode(snaps / "copy.sqlite3") == 0o600


def test_a_restored_replica_is_private(umask022, traces, make_node, dest, tmp_path):
    recs = driver.first_run(traces["A"])[:60]
    node = make_node(pibackup_mode="replica")
    early = [r for r in recs if r.pre_init]
    node.start(early)
    node.calls(recs[len(early) :])
    node.stop()
    out = tmp_path / "restored.sqlite3"
    r = restore_to(dest, out)
    assert r.returncode == 0, r.stderr
    assert mode(out) == 0o600


@pytest.mark.parametrize("mode", ["journal", "replica"])
def test_a_call_no_restore_would_replay_is_refused_in_the_hook_and_nothing_is_stored(mode, traces, make_node, dest, tmp_path):
    # Acknowledged, such a call would be lost at the restore that needs it: lightningd is told
    # not to commit it, and the backup still restores to what was committed before it.
    recs = driver.first_run(traces["A"])[:60]
    node = make_node(pibackup_mode=mode, pibackup_compact_ratio="0", pibackup_filter_tables="none")
    early = [r for r in recs if r.pre_init]
    node.start(early)
    node.calls(recs[len(early) : 50])
    bad = driver.Record(seq=0, pre_init=False, data_version=recs[50].data_version, writes=("VACUUM", *recs[50].writes))
    with pytest.raises(driver.Halted):
        node.call(bad)
    assert "Update pibackup" in node.log_text(), node.log_text()
    out = tmp_path / "restored.sqlite3"
    r = restore_to(dest, out)
    assert r.returncode == 0, r.stderr
    assert dbcompare.backup_differences(node.live.path, out, ()) == []


def test_a_call_no_restore_would_replay_is_refused_even_before_init(traces, make_node, dest, tmp_path):
    # Before init the destination is unknown and calls are only remembered: the check must
    # not wait for init, or the call would be acknowledged and then stored unreplayable.
    recs = driver.first_run(traces["A"])
    early = [r for r in recs if r.pre_init]
    node = make_node(pibackup_filter_tables="none")
    node.start(early[:-1], init=False)
    bad = early[-1]
    with pytest.raises(driver.Halted):
        node.call(driver.Record(seq=0, pre_init=True, data_version=bad.data_version, writes=("VACUUM", *bad.writes)))
    assert node.live.version() == early[-2].data_version  # lightningd committed nothing more
