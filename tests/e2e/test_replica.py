"""Replica mode: a second SQLite database kept in step, under the journal's sequence rules and
crash safety; restore is a verified copy. The core issue's tests, for this mode."""

from __future__ import annotations

import random
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
from test_traces import plan_kills, replay_with_kills

import dbcompare
import driver
from conftest import kill_points
from driver import Halted, Record
from helpers import assert_nothing_acknowledged_lost, cli, restore_to, tmpfs

TRACE_NAMES = driver.trace_names()
MODES = {
    "defaults": ({}, ("utxoset",)),
    "unfiltered": ({"pibackup-filter-tables": "none"}, ()),
}


def replica_node(make_node, **options):
    return make_node(pibackup_mode="replica", **options)


def replica_state(dest: Path):
    from pibackup.store.layout import REPLICA_FILE

    f = dest / "replica-000001" / REPLICA_FILE
    c = sqlite3.connect(f"file:{f}?mode=ro", uri=True)
    try:
        return c.execute("SELECT applied, pending_version, pending FROM pibackup_replica").fetchone()
    finally:
        c.close()


def restore_matches(dest: Path, node: driver.Node, out: Path, filtered=("utxoset",), trace: str = "") -> str:
    r = restore_to(dest, out)
    assert r.returncode == 0, r.stderr
    assert dbcompare.backup_differences(node.live.path, out, filtered) == []
    if trace:
        assert dbcompare.backup_differences(driver.TRACES / f"{trace}.sqlite3", out, filtered) == []
    v = cli("verify", str(dest))
    assert v.returncode == 0 and "replica at data_version" in v.stdout, v.stdout + v.stderr
    return r.stdout


@pytest.mark.parametrize(
    "trace, mode", [(t, m) for t in TRACE_NAMES for m in MODES if (t, m) != ("A", "unfiltered")]
)  # A unfiltered adds nothing filler-A unfiltered does not cover, at 7 s
def test_replica_of_a_replayed_trace_restores_to_the_real_lightningd_database(trace, mode, traces, make_node, dest, tmp_path):
    options, filtered = MODES[mode]
    node = replica_node(make_node, **options)
    driver.run_sessions(node, traces[trace])
    out = restore_matches(dest, node, tmp_path / "r.sqlite3", filtered, trace)
    assert ("--rescan=-" in out) == bool(filtered)
    assert "error" not in [lvl for lvl, _ in node.all_logs], node.log_text()
    assert sorted(p.name for p in dest.iterdir() if p.name.startswith("replica-")) == ["replica-000001"]
    assert not list(dest.glob("gen-*"))


@pytest.mark.parametrize("trace", TRACE_NAMES)
def test_sigkill_at_random_points_loses_no_acknowledged_transaction_in_replica_mode(trace, traces, make_node, tmp_path):
    records = traces[trace]
    total = max(4, kill_points() // 2)  # 10 by default; `make test-long`: 250
    done = rounds = 0
    while done < total:
        rng = random.Random(f"replica-{trace}-{total}-{rounds}")
        kills = plan_kills(len(records), min(len(records) // 4, total - done), rng)
        dest = tmp_path / f"round{rounds}" / "usb"
        dest.mkdir(parents=True)
        node = replica_node(make_node, pibackup_destination=str(dest))
        wanted = len(kills)
        assert replay_with_kills(node, records, kills, rng) == wanted
        restore_matches(dest, node, tmp_path / f"r{rounds}.sqlite3", trace=trace)
        assert "started replica replica-000002" in node.log_text()  # the kills made gaps, as they do
        done += wanted
        rounds += 1
    print(f"replica, {trace}: {done} SIGKILLs in {rounds} replay(s), every acknowledged transaction restored")


def test_replica_rewind_replaces_the_uncommitted_transaction(traces, make_node, dest, tmp_path):
    recs = traces["A"][:60]
    node = replica_node(make_node)
    node.start([r for r in recs if r.pre_init])
    node.calls(recs[9:30])
    nxt = recs[30]
    bogus = Record(
        0,
        False,
        nxt.data_version,
        (
            "INSERT INTO vars (name, intval) VALUES ('never_committed', 1);",
            f"UPDATE vars SET intval = intval + 1 WHERE name = 'data_version' AND intval = {nxt.data_version - 1}",
        ),
    )
    node.call_then_crash_before_commit(bogus)
    # A restore now holds it (it was acknowledged); lightningd's resend replaces it.
    node.start([nxt])
    node.calls(recs[31:])
    node.stop()
    out = tmp_path / "r.sqlite3"
    restore_matches(dest, node, out)
    c = sqlite3.connect(out)
    assert c.execute("SELECT count(*) FROM vars WHERE name='never_committed'").fetchone()[0] == 0
    assert "replaced" in node.log_text()
    assert sorted(p.name for p in dest.iterdir() if p.name.startswith("replica-")) == ["replica-000001"]


def test_replica_pragma_calls_are_not_rewinds_and_a_gap_rebuilds_from_a_snapshot(traces, make_node, dest, tmp_path):
    recs = driver.first_run(traces["A"])[:120]
    node = replica_node(make_node)
    node.start(recs[:9])  # the fresh node's split migration: version 1, PRAGMA at 1, 2, PRAGMA at 2, ...
    node.calls(recs[9:60])
    node.stop()
    node.commit_without_plugin(recs[60])  # lightningd ran without pibackup: a gap
    node.start([])
    node.calls(recs[61:])
    node.stop()
    restore_matches(dest, node, tmp_path / "r.sqlite3")
    log = node.log_text()
    assert "started replica replica-000002 from a snapshot" in log
    assert sorted(p.name for p in dest.iterdir() if p.name.startswith("replica-")) == ["replica-000002"]


def test_replica_refuses_an_older_live_database(traces, make_node, dest, tmp_path):
    recs = driver.first_run(traces["A"])[:80]
    node = replica_node(make_node)
    node.start(recs[:9])
    node.calls(recs[9:50])
    node.stop()
    before = replica_state(dest)
    old = replica_node(make_node)  # another lightning-dir, an old copy of the node: 30 versions behind
    old.start(recs[:9])
    with pytest.raises(Halted):
        old.calls(recs[9:20])
    assert "is OLDER than the replica" in old.log_text()
    assert replica_state(dest) == before and before[0] == recs[49].data_version


@pytest.mark.parametrize("first, then", [("journal", "replica"), ("replica", "journal")])
def test_one_mode_on_the_other_modes_backup_is_a_clear_error(first, then, traces, make_node, dest):
    recs = traces["A"][:20]
    node = make_node(pibackup_mode=first)
    node.start(recs[:9])
    node.stop()
    other = make_node(pibackup_mode=then)
    other.start(recs[:9])
    with pytest.raises(Halted):
        other.calls(recs[9:12])
    assert f"holds a {first}-mode backup" in other.log_text()
    assert f"set pibackup-mode={first}" in other.log_text()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"pibackup-mode": "mirror"}, "give journal or replica"),
        ({"pibackup-mode": "replica", "pibackup-ship": "pi@host:/srv/x"}, "cannot be shipped"),
        ({"pibackup-mode": "replica", "pibackup-destination": ["/media/a/pb", "/media/b/pb"]}, "give pibackup-destination once"),
    ],
)
def test_bad_mode_gets_a_clear_message(options, message):
    from pibackup.app.config import parse_options
    from pibackup.errors import PibackupError

    with pytest.raises(PibackupError) as e:
        parse_options({"pibackup-destination": "/media/usb/pibackup", **options})  # type: ignore[dict-item]
    assert message in str(e.value)


def test_replica_directory_moved_away_under_the_plugin_halts_and_loses_nothing(traces, make_node, dest, tmp_path):
    """SQLite keeps committing into the open files of a directory that is gone from its
    path (deleted, unplugged, lazily unmounted): the next call must be refused."""
    recs = driver.first_run(traces["A"])
    node = replica_node(make_node)
    node.start(recs[:9])
    node.calls(recs[9:60])
    before = node.live.version()
    moved = tmp_path / "moved"
    dest.rename(moved)
    with pytest.raises(Halted):
        node.call(recs[60])
    assert node.live.version() == before
    assert "the backup directory vanished" in node.log_text()
    assert_nothing_acknowledged_lost(moved, node, tmp_path, "moved", recs[60])


def test_replica_full_medium_halts_the_node_and_loses_nothing(traces, make_node, tmp_path):
    with tmpfs(tmp_path / "stick", "size=640k") as stick:  # room for the start, not for the whole trace
        dest = stick / "pibackup"
        dest.mkdir()
        recs = driver.first_run(traces["A"])
        node = replica_node(make_node, pibackup_destination=str(dest))
        node.start(recs[:9])
        refused = None
        for r in recs[9:]:
            try:
                node.call(r)
            except Halted:
                refused = r
                break
        assert refused is not None, "a 640 KiB stick should fill up"
        assert "backing up" in node.log_text()  # after the start: every call before it was written
        assert "the backup medium is full" in node.log_text(), node.log_text()
        copy = tmp_path / "copy"
        shutil.copytree(dest, copy)
    assert_nothing_acknowledged_lost(copy, node, tmp_path, "full", refused)


def _damage_replica(dest: Path) -> None:
    f = dest / "replica-000001" / "replica.sqlite3"
    data = bytearray(f.read_bytes())
    data[:16] = b"not a database!!"
    f.write_bytes(bytes(data))


def test_a_damaged_replica_is_set_aside_not_deleted_and_a_new_one_is_built(traces, make_node, dest, tmp_path):
    recs = driver.first_run(traces["A"])
    node = replica_node(make_node)
    node.start(recs[:9])
    node.calls(recs[9:80])
    node.stop()
    _damage_replica(dest)
    node.start([])
    node.calls(recs[80:200])
    node.stop()
    log = node.log_text()
    assert "It is kept as replica-000001.damaged" in log, log
    names = sorted(p.name for p in dest.iterdir() if p.name.startswith("replica-"))
    assert names == ["replica-000001.damaged", "replica-000002"], names
    restore_matches(dest, node, tmp_path / "r.sqlite3")


def test_a_damaged_replica_newer_than_the_live_database_refuses_the_node(traces, make_node, dest, tmp_path):
    recs = driver.first_run(traces["A"])[:80]
    node = replica_node(make_node)
    node.start(recs[:9])
    node.calls(recs[9:50])
    node.stop()
    f = dest / "replica-000001" / "replica.sqlite3"
    c = sqlite3.connect(f)
    c.execute("DROP TABLE pibackup_replica")  # unusable as a replica, its data_version still readable
    c.close()
    before = f.read_bytes()
    old = replica_node(make_node)  # an old copy of the node: behind what the damaged replica holds
    old.start(recs[:9])
    with pytest.raises(Halted):
        old.calls(recs[9:20])
    assert "is OLDER than what it holds" in old.log_text(), old.log_text()
    assert f.read_bytes() == before
    assert sorted(p.name for p in dest.iterdir() if p.name.startswith("replica-")) == ["replica-000001"]


def test_a_changed_filter_starts_a_new_replica(traces, make_node, dest, tmp_path):
    recs = driver.first_run(traces["A"])
    node = replica_node(make_node)
    node.start(recs[:9])
    node.calls(recs[9:150])
    node.stop()
    node.options["pibackup-filter-tables"] = "none"
    node.start([])
    node.calls(recs[150:])
    node.stop()
    assert "pibackup-filter-tables changed" in node.log_text()
    assert sorted(p.name for p in dest.iterdir() if p.name.startswith("replica-")) == ["replica-000002"]
    restore_matches(dest, node, tmp_path / "r.sqlite3", filtered=())


def test_a_pending_transaction_of_a_migration_restores_with_foreign_keys_off(traces, make_node, dest, tmp_path):
    """lightningd runs a migration's table rebuild between PRAGMA foreign_keys = OFF and ON.
    If the backup ends there, the restore applies it as lightningd did."""
    recs = driver.load_trace("A")[:3]  # v1, PRAGMA foreign_keys = OFF, v2 (a table rebuild)
    assert recs[1].writes == ("PRAGMA foreign_keys = OFF;",) and recs[2].data_version == 2
    node = replica_node(make_node)
    node.start(list(recs))
    node.kill()
    assert replica_state(dest)[1] == 2  # v2 stored as the pending transaction, with foreign keys off
    f = dest / "replica-000001" / "replica.sqlite3"
    c = sqlite3.connect(f"file:{f}?mode=ro", uri=True)
    assert c.execute("SELECT pending_fk FROM pibackup_replica").fetchone() == (0,)
    c.close()
    out = tmp_path / "r.sqlite3"
    r = restore_to(dest, out)
    assert r.returncode == 0, r.stderr
    assert dbcompare.backup_differences(node.live.path, out, ("utxoset",)) == []


def test_restore_from_a_read_only_copy_after_a_clean_stop(traces, make_node, dest, tmp_path):
    recs = driver.first_run(traces["A"])
    node = replica_node(make_node)
    node.start(recs[:9])
    node.calls(recs[9:200])
    node.stop()
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "--bind", str(dest), str(ro)], capture_output=True).returncode != 0:
        pytest.skip("needs root for a read-only bind mount")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], check=True)
        out = tmp_path / "r.sqlite3"
        r = restore_to(ro, out)
        assert r.returncode == 0, r.stderr
        assert dbcompare.backup_differences(node.live.path, out, ("utxoset",)) == []
        v = cli("verify", str(ro))
        assert v.returncode == 0, v.stdout + v.stderr
    finally:
        subprocess.run(["umount", str(ro)], check=True)
