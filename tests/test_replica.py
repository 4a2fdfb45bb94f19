"""Replica mode: a second SQLite database kept in step, under the journal's sequence rules and
crash safety; restore is a verified copy. The core issue's tests, for this mode."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest
from test_traces import plan_kills, replay_with_kills

import dbcompare
import driver
from conftest import kill_points
from driver import Halted, Record
from helpers import cli, restore_to

TRACE_NAMES = driver.trace_names()
MODES = {
    "defaults": ({}, ("utxoset",)),
    "unfiltered": ({"pibackup-filter-tables": "none"}, ()),
}


def replica_node(make_node, **options):
    return make_node(pibackup_mode="replica", **options)


def replica_state(dest: Path):
    from pibackup.replica import REPLICA_FILE

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


def test_sigkill_at_random_points_loses_no_acknowledged_transaction_in_replica_mode(traces, make_node, tmp_path):
    records = traces["A"]
    total = max(4, kill_points() // 2)  # 10 by default; `make test-long`: 250
    done = rounds = 0
    while done < total:
        rng = random.Random(f"replica-{total}-{rounds}")
        kills = plan_kills(len(records), min(len(records) // 4, total - done), rng)
        dest = tmp_path / f"round{rounds}" / "usb"
        dest.mkdir(parents=True)
        node = replica_node(make_node, pibackup_destination=str(dest))
        wanted = len(kills)
        assert replay_with_kills(node, records, kills, rng) == wanted
        restore_matches(dest, node, tmp_path / f"r{rounds}.sqlite3", trace="A")
        assert "started replica replica-000002" in node.log_text()  # the kills made gaps, as they do
        done += wanted
        rounds += 1
    print(f"replica: {done} SIGKILLs in {rounds} replay(s), every acknowledged transaction restored")


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
    ],
)
def test_bad_mode_gets_a_clear_message(options, message):
    from pibackup.config import parse_options
    from pibackup.errors import PibackupError

    with pytest.raises(PibackupError) as e:
        parse_options({"pibackup-destination": "/media/usb/pibackup", **options})
    assert message in str(e.value)
