"""Core Lightning's sequence rules and start-up order, each proven through the real plugin."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

import dbcompare
import driver
from driver import Halted, Record
from helpers import cli, restore_to, tree_digest
from pibackup.store.reader import scan_segment

MODES = pytest.mark.parametrize("mode", ["journal", "replica"])  # the rules hold in both backup formats


def restored(dest: Path, tmp_path: Path, name: str = "restored.sqlite3") -> Path:
    out = tmp_path / name
    r = restore_to(dest, out)
    assert r.returncode == 0, r.stderr
    return out


def test_rewind_replaces_the_uncommitted_transaction(traces, make_node, dest, tmp_path):
    recs = traces["A"][:40]
    node = make_node()
    node.start([r for r in recs if r.pre_init])
    node.calls(recs[9:30])
    nxt = recs[30]
    # lightningd gets continue for a different transaction with the next data_version,
    # then dies before committing it.
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
    # At the restart the same data_version comes again, with what lightningd really commits.
    node.start([nxt])
    node.calls(recs[31:])
    node.stop()
    out = restored(dest, tmp_path)
    assert dbcompare.backup_differences(node.live.path, out) == []
    c = sqlite3.connect(out)
    assert c.execute("SELECT count(*) FROM vars WHERE name='never_committed'").fetchone()[0] == 0
    assert ", 1 rewound" in cli("verify", str(dest)).stdout


@MODES
def test_rewind_of_an_identical_resend_keeps_one_copy(mode, traces, make_node, dest, tmp_path):
    recs = traces["A"][:60]
    node = make_node(pibackup_mode=mode)
    node.start([r for r in recs if r.pre_init])
    node.calls(recs[9:50])
    node.call_then_crash_before_commit(recs[50])
    node.start([recs[50], recs[51]])
    node.calls(recs[52:])
    node.stop()
    assert dbcompare.backup_differences(node.live.path, restored(dest, tmp_path)) == []


def test_pragma_only_calls_that_repeat_a_version_are_not_rewinds(traces, make_node, dest, tmp_path):
    recs = traces["A"][:9]
    assert recs[1].writes == ("PRAGMA foreign_keys = OFF;",) and recs[1].data_version == recs[0].data_version
    node = make_node()
    node.start(recs)
    node.stop()
    out = restored(dest, tmp_path)
    # The 211-statement schema of version 1 survived the PRAGMA call with version 1.
    assert dbcompare.backup_differences(node.live.path, out) == []
    c = sqlite3.connect(out)
    assert c.execute("SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()[0] > 30
    report = cli("verify", str(dest)).stdout
    assert "2 PRAGMA calls, 0 rewound" in report, report


def test_gap_starts_a_new_generation_from_a_snapshot(traces, make_node, dest, tmp_path):
    recs = driver.first_run(traces["A"])
    # No automatic compaction: one finishing before the stop (or not, by timing) would
    # number the gap's generation 3 and let retention delete generation 1.
    node = make_node(pibackup_compact_ratio="0")
    node.start([r for r in recs if r.pre_init])
    node.calls(recs[9:200])
    node.stop()
    # lightningd runs with the plugin dead (plain plugin=): these commits bypass it.
    for r in recs[200:230]:
        node.commit_without_plugin(r)
    node.start([recs[230], recs[231]])
    node.calls(recs[232:300])
    node.stop()
    assert "committed transactions without pibackup" in node.log_text()
    report = cli("verify", str(dest)).stdout
    assert "gen-000002: snapshot at data_version" in report, report
    assert dbcompare.backup_differences(node.live.path, restored(dest, tmp_path)) == []
    # The older generation is kept and still restores to where it ended.
    older = tmp_path / "older.sqlite3"
    assert cli("restore", str(dest), str(older), "--generation", "1").returncode == 0


@MODES
def test_first_start_on_an_existing_node_snapshots_it(mode, traces, make_node, dest, tmp_path):
    recs = driver.first_run(traces["A"])
    node = make_node(pibackup_mode=mode)
    for r in recs[:400]:
        node.commit_without_plugin(r)
    node.start([recs[400], recs[401], recs[402]])
    node.calls(recs[403:450])
    node.stop()
    if mode == "journal":
        snaps = list(dest.glob("gen-000001/snapshot-v*"))
        assert [s.name for s in snaps] == [f"snapshot-v{recs[402].data_version}.pbsnap"]
    else:
        assert f"started replica replica-000001 from a snapshot at data_version {recs[402].data_version}" in node.log_text()
    assert dbcompare.backup_differences(node.live.path, restored(dest, tmp_path)) == []


@MODES
def test_live_database_older_than_the_backup_halts_and_leaves_the_backup_untouched(mode, traces, make_node, dest, tmp_path):
    recs = driver.first_run(traces["A"])
    node = make_node(pibackup_mode=mode)
    node.start([r for r in recs if r.pre_init])
    node.calls(recs[9:100])
    node.stop()
    old_copy = tmp_path / "old.sqlite3"
    shutil.copy(node.live.path, old_copy)
    node.start([])
    node.calls(recs[100:150])
    node.stop()
    before = tree_digest(dest)
    # The user puts an old copy of the database back.
    node.live.close()
    shutil.copy(old_copy, node.live.path)
    node.live = driver.LiveDB(node.live.path)
    early = recs[100:102]
    node.start(early)  # lightningd's pre-init writes on the old DB, then init
    assert "OLDER than the" in node.plugin.log_text()
    with pytest.raises(Halted):
        node.call(recs[102])
    assert tree_digest(dest) == before
    assert "Traceback" not in node.log_text()


@MODES
def test_calls_before_init_are_backed_up(mode, traces, make_node, dest, tmp_path):
    recs = traces["A"]
    node = make_node(pibackup_mode=mode)
    node.start(recs[:9])  # a fresh node: 9 calls before init, schema included
    node.stop()
    out = restored(dest, tmp_path)
    assert dbcompare.backup_differences(node.live.path, out) == []
    assert not list(dest.glob("gen-*/snapshot*")), "a fresh node needs no snapshot"
    if mode == "replica":
        assert "from an empty database (new node)" in node.log_text()


@MODES
def test_plugin_killed_before_init_repairs_the_gap_from_the_live_db(mode, traces, make_node, dest, tmp_path):
    recs = driver.first_run(traces["A"])
    node = make_node(pibackup_mode=mode)
    node.start(recs[:9])
    node.calls(recs[9:100])
    node.stop()
    node.start(recs[100:104], init=False)  # answered, so committed by lightningd ...
    node.kill()  # ... and the plugin dies before init ever names the destination
    node.start(recs[104:106])
    node.calls(recs[106:150])
    node.stop()
    assert dbcompare.backup_differences(node.live.path, restored(dest, tmp_path)) == []


@MODES
def test_writes_after_shutdown_are_backed_up_until_stdin_closes(mode, traces, make_node, dest, tmp_path):
    recs = driver.first_run(traces["A"])
    node = make_node(pibackup_mode=mode)
    node.start(recs[:9])
    node.calls(recs[9:100])
    rc = node.stop(after_shutdown=recs[100:103])
    assert rc == 0
    out = restored(dest, tmp_path)
    c = sqlite3.connect(out)
    assert c.execute("SELECT intval FROM vars WHERE name='data_version'").fetchone()[0] == recs[102].data_version
    assert dbcompare.backup_differences(node.live.path, out) == []


@MODES
def test_the_plugin_leaves_on_its_own_after_lightningds_last_writes_at_stop(mode, traces, make_node, dest, tmp_path):
    """lightningd does not close the plugin's stdin at a stop: it kills a plugin that has not
    exited 30 s after the shutdown notification. pibackup leaves by itself once the last
    writes are over, with all of them in the backup, and the next start continues it."""
    recs = driver.first_run(traces["A"])
    node = make_node(pibackup_mode=mode)
    node.start(recs[:9])
    node.calls(recs[9:100])
    rc = node.stop_as_lightningd(after_shutdown=recs[100:103])
    assert rc == 0, "the plugin did not exit on its own: lightningd would have killed it"
    assert "pibackup exits" in node.log_text()
    out = restored(dest, tmp_path, "at-stop.sqlite3")
    c = sqlite3.connect(out)
    assert c.execute("SELECT intval FROM vars WHERE name='data_version'").fetchone()[0] == recs[102].data_version
    c.close()
    node.start(recs[103:106])
    node.calls(recs[106:150])
    node.stop()
    assert "cannot be continued" not in node.log_text()  # continued: no gap, no new snapshot
    assert dbcompare.backup_differences(node.live.path, restored(dest, tmp_path)) == []


def _tear(dest, version: int) -> None:
    """A power cut during the next append: part of a frame reached the stick."""
    seg = sorted(dest.glob("gen-*/seg-*.pbj"))[-1]
    end = scan_segment(str(seg)).valid_length  # where the next append goes (zeros may follow)
    with open(seg, "r+b") as f:
        f.seek(end)
        f.write(b"\x01\x01\x00\x00" + version.to_bytes(4, "big") + b"\x00\x00\x10\x00garbage")


def test_torn_append_from_a_power_cut_is_skipped_and_the_backup_goes_on(traces, make_node, dest, tmp_path):
    recs = driver.first_run(traces["A"])
    node = make_node()
    node.start(recs[:9])
    node.calls(recs[9:100])
    node.kill()
    _tear(dest, recs[100].data_version)
    r = cli("restore", str(dest), str(tmp_path / "mid.sqlite3"))
    assert r.returncode == 0 and "unfinished append" in r.stderr, r.stderr
    node.start(recs[100:102])
    node.calls(recs[102:160])
    node.stop()
    # The plugin died before it could confirm its last transaction: a new generation.
    assert "cannot be continued" in node.log_text()
    assert dbcompare.backup_differences(node.live.path, restored(dest, tmp_path)) == []
    v = cli("verify", str(dest))
    assert v.returncode == 0 and "unfinished append" in v.stdout, v.stdout


def test_torn_tail_after_a_rewound_transaction_continues_in_a_new_segment(traces, make_node, dest, tmp_path):
    recs = driver.first_run(traces["A"])
    node = make_node(pibackup_compact_ratio="0")  # a compaction would start gen-000002 too
    node.start(recs[:9])
    node.calls(recs[9:100])
    node.call_then_crash_before_commit(recs[100])
    _tear(dest, recs[101].data_version)
    node.start(recs[100:102])  # the resend: the same generation goes on
    node.calls(recs[102:160])
    node.stop()
    assert "continuing in a new segment" in node.log_text()
    assert "gen-000002" not in cli("verify", str(dest)).stdout
    assert dbcompare.backup_differences(node.live.path, restored(dest, tmp_path)) == []
    assert cli("verify", str(dest)).returncode == 0


@MODES
def test_a_transaction_that_replaced_ours_before_an_init_that_never_came_is_not_lost(mode, traces, make_node, dest, tmp_path):
    """lightningd gets continue for N and dies before committing it; on the next start it
    commits a different N before init, and the plugin never reaches init; on the start
    after that the backup must not keep our never-committed N."""
    recs = driver.first_run(traces["A"])
    node = make_node(pibackup_mode=mode)
    node.start(recs[:9])
    node.calls(recs[9:100])
    v = recs[100].data_version
    ours = Record(
        0,
        False,
        v,
        (
            "INSERT INTO vars (name, intval) VALUES ('never_committed', 1);",
            f"UPDATE vars SET intval = intval + 1 WHERE name = 'data_version' AND intval = {v - 1}",
        ),
    )
    node.call_then_crash_before_commit(ours)
    node.start([recs[100]], init=False)  # committed by lightningd ...
    node.kill()  # ... and the plugin dies before init
    node.start([recs[101], recs[102]])  # starts at N+1, exactly where our journal would go on
    node.calls(recs[103:140])
    node.stop()
    out = restored(dest, tmp_path)
    assert dbcompare.backup_differences(node.live.path, out) == []
    assert sqlite3.connect(out).execute("SELECT count(*) FROM vars WHERE name='never_committed'").fetchone()[0] == 0


def test_developer_mode_argument_is_accepted(traces, make_node, dest, tmp_path):
    recs = driver.first_run(traces["A"])
    node = make_node()
    node.plugin_argv = ["--developer"]
    node.start(recs[:9])
    node.calls(recs[9:40])
    node.stop()
    assert dbcompare.backup_differences(node.live.path, restored(dest, tmp_path)) == []


def test_a_changed_filter_starts_a_new_generation(traces, make_node, dest, tmp_path):
    """Continuing a generation after pibackup-filter-tables changed would mix filtered and
    unfiltered frames of the same table in one journal."""
    recs = driver.first_run(traces["A"])
    node = make_node(pibackup_compact_ratio="0")
    node.start(recs[:9])
    node.calls(recs[9:150])
    node.stop()
    node.options["pibackup-filter-tables"] = "none"
    node.start([])
    node.calls(recs[150:])
    node.stop()
    assert "pibackup-filter-tables changed (gen-000001 filters utxoset, now nothing)" in node.log_text()
    assert sorted(p.name for p in dest.iterdir() if p.name.startswith("gen-")) == ["gen-000001", "gen-000002"]
    out = restored(dest, tmp_path)
    assert dbcompare.differences(node.live.path, out) == []  # nothing filtered: equal, utxoset too
