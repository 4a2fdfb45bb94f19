"""Several destinations: a USB stick and a second SD card. Every
transaction is acknowledged only once each destination in use has it; one failing halts the
node (default) or, with continue-degraded, is dropped with a warning and rejoins in step
when it is usable again."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

import dbcompare
import driver
from driver import Halted
from helpers import assert_nothing_acknowledged_lost, cli
from pibackup.fanout.destinations import REJOIN_CHECK_SECONDS


def restores_to_live(dest: Path, node: driver.Node, out: Path) -> None:
    r = cli("restore", str(dest), str(out))
    assert r.returncode == 0, r.stderr
    assert dbcompare.backup_differences(node.live.path, out) == []


@pytest.fixture
def two(tmp_path: Path):
    a, b = tmp_path / "stick" / "pibackup", tmp_path / "sd2" / "pibackup"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    return a, b


def test_each_destination_holds_a_full_backup(two, traces, make_node, tmp_path):
    a, b = two
    node = make_node(pibackup_destination=[str(a), str(b)])
    driver.run_sessions(node, traces["A"])
    restores_to_live(a, node, tmp_path / "a.sqlite3")
    restores_to_live(b, node, tmp_path / "b.sqlite3")
    assert "error" not in [lvl for lvl, _ in node.all_logs], node.log_text()


def test_one_destination_failing_halts_the_node_by_default(two, traces, make_node, tmp_path):
    a, b = two
    recs = driver.first_run(traces["A"])
    node = make_node(pibackup_destination=[str(a), str(b)])
    node.start(recs[:9])
    node.calls(recs[9:80])
    before = node.live.version()
    st = node.rpc("pibackup-status")
    assert [d["path"] for d in st["destinations"]] == [str(a), str(b)] and st["on_destination_failure"] == "halt"
    shutil.rmtree(b)
    with pytest.raises(Halted):
        node.call(recs[80])
    assert node.live.version() == before, "a transaction not durable on every destination was committed"
    assert f"destination {b}: cannot write the backup" in node.log_text() and "vanished" in node.log_text()
    assert_nothing_acknowledged_lost(a, node, tmp_path, "a", recs[80])


def test_continue_degraded_goes_on_warns_and_the_destination_rejoins_in_step(two, traces, make_node, tmp_path, leds):
    a, b = two
    recs = driver.first_run(traces["A"])
    node = make_node(
        pibackup_destination=[str(a), str(b)],
        pibackup_on_destination_failure="continue-degraded",
        pibackup_led="ACT",
        pibackup_led_dir=str(leds),
    )
    node.start(recs[:9])
    node.calls(recs[9:80])
    shutil.rmtree(b)  # the second card fails
    node.calls(recs[80:150])  # the node goes on
    assert f"destination {b} dropped" in node.log_text()
    st = node.rpc("pibackup-status")
    assert st["state"] == "warning" and any(f"destination {b} is not in use" in w for w in st["warnings"]), st
    assert [d.get("state") for d in st["destinations"]] == ["ok", "dropped"]
    assert (leds / "ACT" / "trigger").read_text() == "timer"
    restores_to_live(a, node, tmp_path / "a-degraded.sqlite3")

    b.mkdir()  # a new card in its place
    time.sleep(REJOIN_CHECK_SECONDS + 0.5)
    node.calls(recs[150:200])
    assert f"destination {b} is back and in step" in node.log_text()
    st = node.rpc("pibackup-status")
    assert st["state"] == "ok" and [d.get("state") for d in st["destinations"]] == ["ok", "ok"], st
    assert (leds / "ACT" / "trigger").read_text() == "heartbeat"
    node.stop()
    restores_to_live(a, node, tmp_path / "a.sqlite3")
    restores_to_live(b, node, tmp_path / "b.sqlite3")


def test_continue_degraded_still_halts_when_no_destination_is_left(two, traces, make_node, tmp_path):
    a, b = two
    recs = driver.first_run(traces["A"])
    node = make_node(pibackup_destination=[str(a), str(b)], pibackup_on_destination_failure="continue-degraded")
    node.start(recs[:9])
    node.calls(recs[9:60])
    shutil.rmtree(b)
    node.calls(recs[60:70])
    before = node.live.version()
    shutil.rmtree(a)
    with pytest.raises(Halted):
        node.call(recs[70])
    assert node.live.version() == before
    assert "every backup destination failed" in node.log_text()
