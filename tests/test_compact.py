"""Compaction: a new generation's snapshot built from the old snapshot plus the journal, in
the background, while db_write calls go on; the switch and retention crash-safe at every step."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Dict

import pytest

import dbcompare
import driver
from helpers import cli, restore_to


def status(node: driver.Node) -> Dict[str, Any]:
    return node.rpc("pibackup-status")


def wait_compacted(node: driver.Node, runs: int) -> Dict[str, Any]:
    """Poll pibackup-status until `runs` compactions are done (never asserts on time; the
    limit only keeps a broken build from hanging the suite)."""
    for _ in range(1200):
        c = status(node)["compaction"]
        if c["state"] == "failed":
            raise AssertionError(c)
        if c["runs"] >= runs and c["state"] == "idle":
            return c
        time.sleep(0.05)
    raise AssertionError(f"compaction did not finish: {c}")


def restored_equals_live(dest: Path, node: driver.Node, out: Path) -> None:
    r = restore_to(dest, out)
    assert r.returncode == 0, r.stderr
    assert dbcompare.backup_differences(node.live.path, out, ("utxoset",)) == []
    v = cli("verify", str(dest))
    assert v.returncode == 0, v.stdout + v.stderr


def test_manual_compaction_while_writes_go_on_restores_everything(traces, make_node, dest, tmp_path):
    recs = driver.first_run(traces["A"])
    node = make_node()
    node.start([r for r in recs if r.pre_init])
    node.calls(recs[9:300])
    assert node.rpc("pibackup-compact")["compaction"] == "started"
    node.calls(recs[300:420])  # the hook goes on while the child builds the snapshot
    c = wait_compacted(node, 1)
    assert c["last"]["generation"] == "gen-000002" and c["last"]["from"] == "gen-000001"
    node.calls(recs[420:])
    node.stop()
    restored_equals_live(dest, node, tmp_path / "r.sqlite3")
    gens = sorted(p.name for p in dest.iterdir() if p.name.startswith("gen-"))
    assert gens == ["gen-000001", "gen-000002"], gens
    snaps = list((dest / "gen-000002").glob("snapshot-v*.sqlite3"))
    assert len(snaps) == 1
    base = int(snaps[0].name[len("snapshot-v") : -len(".sqlite3")])
    assert base == c["last"]["base_version"] and base >= recs[299].data_version - 1


# Each step of a compaction, in order (pibackup/compact.py, FORMAT.md "Compaction"): the
# plugin (or its child) SIGKILLs itself there, as a power cut or a kill would stop it.
PLUGIN_STEPS = ["cut", "segment", "follow", "switch-synced", "switch-renamed", "retention"]
CHILD_STEPS = ["child-replay", "child-snapshot"]


def calls_until_dead(node: driver.Node, recs, i: int) -> int:
    """Go on with lightningd's calls until the plugin dies; returns the index of the first
    call that was not committed."""
    while True:
        try:
            if i < len(recs):
                node.call(recs[i])
                i += 1
            else:
                status(node)
                time.sleep(0.02)
        except driver.PluginDied:
            node.kill()
            return i
        if i == len(recs) and node.plugin is not None and node.plugin.proc.poll() is not None:
            node.kill()
            return i


@pytest.mark.parametrize("step", PLUGIN_STEPS)
def test_plugin_killed_at_each_compaction_step_loses_nothing(step, traces, make_node, dest, tmp_path):
    recs = driver.first_run(traces["A"])[:450]
    # Every acknowledged transaction synced (no batching), so a restore after the crash must
    # equal lightningd's database exactly; keep 1 generation, so the switch deletes the old one.
    node = make_node(pibackup_batch_seconds=0, pibackup_keep_generations=1)
    node.plugin_env = {"PIBACKUP_TEST_CRASH": step}
    node.start([r for r in recs if r.pre_init])
    node.calls(recs[9:250])
    assert node.rpc("pibackup-compact")["compaction"] == "started"
    i = calls_until_dead(node, recs, 250)
    assert i < len(recs) or step in ("retention", "switch-renamed", "switch-synced"), "crash point never reached"
    # A restore of what the crash left: every committed transaction. The call in flight at
    # the kill may be in it too (journalled, answer lost): lightningd resends that
    # data_version at its restart, and it replaces the journalled one (a rewind).
    out = tmp_path / "after-crash.sqlite3"
    r = restore_to(dest, out)
    assert r.returncode == 0, r.stderr
    if dbcompare.backup_differences(node.live.path, out, ("utxoset",)):
        assert i < len(recs)
        ahead = tmp_path / "live-plus-inflight.sqlite3"
        shutil.copy(node.live.path, ahead)
        db = driver.LiveDB(ahead)
        db.commit(recs[i].writes)
        db.close()
        assert dbcompare.backup_differences(ahead, out, ("utxoset",)) == []
    assert cli("verify", str(dest)).returncode == 0
    names = sorted(p.name for p in dest.iterdir() if p.name.startswith("gen-"))
    if step == "cut":
        assert names == ["gen-000001"], names
    elif step in ("segment", "follow", "switch-synced"):
        assert "gen-000002.partial" in names and "gen-000002" not in names, names
    else:
        assert "gen-000002" in names, names
    # lightningd restarts: its first call is the one that was never committed (if any).
    node.plugin_env = {}
    node.start(recs[i : i + 1])
    node.calls(recs[i + 1 :])
    node.stop()
    names = sorted(p.name for p in dest.iterdir() if p.name.startswith("gen-"))
    assert not [n for n in names if "." in n], names  # .partial and .deleted removed at the start
    restored_equals_live(dest, node, tmp_path / "after-restart.sqlite3")


@pytest.mark.parametrize("step", CHILD_STEPS)
def test_compaction_process_killed_fails_the_compaction_not_the_backup(step, traces, make_node, dest, tmp_path):
    recs = driver.first_run(traces["A"])[:450]
    node = make_node(pibackup_batch_seconds=0)
    node.plugin_env = {"PIBACKUP_TEST_CRASH": step}
    node.start([r for r in recs if r.pre_init])
    node.calls(recs[9:300])
    node.rpc("pibackup-compact")
    node.calls(recs[300:320])
    for _ in range(1200):
        c = status(node)["compaction"]
        if c["state"] == "failed":
            break
        time.sleep(0.05)
    assert c["state"] == "failed" and "compaction process died" in c["error"], c
    assert "compaction failed" in node.log_text()
    assert not list(dest.glob("gen-*.partial"))  # cleaned up at once
    node.calls(recs[320:])
    node.stop()
    restored_equals_live(dest, node, tmp_path / "r.sqlite3")
    assert sorted(p.name for p in dest.iterdir() if p.name.startswith("gen-")) == ["gen-000001"]
