"""What a Pi owner sees: systemd's STATUS line over a real unix datagram socket, the LED in
a directory tree standing in for /sys/class/leds, the status RPC and command, the logs."""

from __future__ import annotations

import json

import pytest

import driver
from driver import Halted
from helpers import cli, received


def test_systemd_status_line_says_ok_then_failed(make_node, traces, notify_socket, tmp_path):
    sock, path = notify_socket
    node = make_node()
    node.plugin_env = {"NOTIFY_SOCKET": path}
    recs = traces["A"]
    node.start(recs[:9])
    ok = received(sock, "pibackup: ok")
    assert any("v7" in m and "1 generation" in m for m in ok), ok
    node.stop()
    bad = make_node(pibackup_destination=str(tmp_path / "not-mounted"))
    bad.plugin_env = {"NOTIFY_SOCKET": path}
    bad.start(recs[:9])
    failed = received(sock, "FAILED")
    assert "does not exist: is the USB stick mounted?" in failed[-1]


def test_led_heartbeat_when_healthy_and_previous_trigger_restored(make_node, traces, leds):
    node = make_node(pibackup_led="ACT", pibackup_led_dir=str(leds))
    node.start(traces["A"][:9])
    assert (leds / "ACT" / "trigger").read_text() == "heartbeat"
    node.stop()
    assert (leds / "ACT" / "trigger").read_text() == "mmc0"


def test_led_blinks_fast_on_a_warning(make_node, traces, leds):
    node = make_node(pibackup_led="ACT", pibackup_led_dir=str(leds), pibackup_min_free_mb=1 << 20)
    node.start(traces["A"][:9])
    assert (leds / "ACT" / "trigger").read_text() == "timer"
    assert (leds / "ACT" / "delay_on").read_text() == "100"
    st = node.rpc("pibackup-status")
    assert st["state"] == "warning" and "free space" in st["warnings"][0]
    assert sum(1 for lvl, m in node.plugin.logs if "MiB free" in m) == 1
    node.stop()


def test_led_steady_on_when_the_backup_failed(make_node, traces, leds, tmp_path):
    node = make_node(pibackup_led="ACT", pibackup_led_dir=str(leds), pibackup_destination="relative/path")
    node.start(traces["A"][:9])
    assert (leds / "ACT" / "trigger").read_text() == "none"
    assert (leds / "ACT" / "brightness").read_text() == "255"
    with pytest.raises(Halted):
        node.call(traces["A"][9])
    assert (leds / "ACT" / "trigger").read_text() == "none", "a failed backup keeps the LED on"


def test_a_wrong_led_name_is_a_warning_not_a_halt(make_node, traces, leds):
    node = make_node(pibackup_led="PWR", pibackup_led_dir=str(leds))
    node.start(traces["A"][:9])
    assert "pibackup-led=PWR: cannot read" in node.plugin.log_text()
    node.call(traces["A"][9])
    node.stop()


def test_status_rpc_shows_what_the_owner_needs(make_node, traces, dest):
    node = make_node()
    node.start(traces["A"][:9])
    node.calls(traces["A"][9:40])
    st = node.rpc("pibackup-status")
    assert st["state"] == "ok" and st["mode"] == "journal" and st["warnings"] == []
    assert st["data_version"] == traces["A"][39].data_version
    d = st["destinations"][0]
    assert d["path"] == str(dest) and d["free_bytes"] > 0 and d["generations"] == 1
    assert st["counters"]["frames"] >= 31 and st["counters"]["syncs"] > 0
    assert st["uptime_seconds"] >= 0 and st["shipping"] == "not configured"
    node.stop()


def test_a_persisting_failure_is_logged_once(make_node, traces, tmp_path):
    node = make_node(pibackup_destination=str(tmp_path / "gone"))
    node.start(traces["A"][:9])
    for r in traces["A"][9:12]:  # lightningd would stop at the first; the plugin must not flood anyway
        resp = node.plugin.request("db_write", {"data_version": r.data_version, "writes": list(r.writes)})
        assert resp["result"] != {"result": "continue"}
    errors = [m for lvl, m in node.plugin.logs if lvl == "error"]
    assert len(errors) == 1, errors


def test_offline_status_command(make_node, traces, dest):
    node = make_node(pibackup_compact_ratio="0")  # one generation, so its name is known
    driver.run_sessions(node, traces["A"])
    r = cli("status", str(dest), "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["state"] == "ok" and st["last_data_version"] == traces["A"][-1].data_version
    assert st["generations"][0]["name"] == "gen-000001" and not st["writer_running"]
    r = cli("status", str(dest))
    assert "newest data_version" in r.stdout and "no pibackup is writing it now" in r.stdout


def test_a_read_only_medium_is_a_warning(tmp_path):
    """The kernel remounts a failing stick read-only; the monitor says so before a write fails.
    (A tmpfs with a writer's files open cannot be remounted read-only here, so the check is
    shown on a read-only mount directly.)"""
    from helpers import tmpfs
    from pibackup.app.status import check_destination

    with tmpfs(tmp_path / "ro", "size=1m,ro") as mnt:
        warnings = check_destination(str(mnt), 0)
    assert len(warnings) == 1 and "read-only" in warnings[0] and "replace it" in warnings[0]
    assert "unplugged" in check_destination(str(tmp_path / "gone"), 0)[0]


def test_a_warning_whose_numbers_change_is_logged_once(tmp_path):
    # Free space shrinking by a MiB between two checks is the same problem: one log line
    # (then an hourly reminder), not one per check. It made the LED test above flaky while
    # other programs wrote to the same disk.
    from pibackup.app.status import Reporter

    logged = []
    free = iter([80123, 80122, 80121])
    r = Reporter(lambda m, lvl: logged.append(m), dict, lambda: [], 0, lambda: [f"only {next(free)} MiB free on /x"])
    for _ in range(3):
        r.check()
    assert logged == ["only 80123 MiB free on /x"]
    assert r.health.warnings == ["only 80121 MiB free on /x"]  # status shows the latest figure


def test_a_failure_pending_for_the_next_write_shows_and_can_go_away(tmp_path, leds):
    # A failure met off the hook's path (the flusher, a compaction's switch) shows before
    # lightningd's next write is refused; under continue-degraded a rejoin may still let the
    # node go on, and then the state must not stay "failed". One from failed() stays.
    from pibackup.app.status import Led, Reporter

    pending = ["cannot write the backup at /x: I/O error. lightningd will be halted at its next database write", None]
    r = Reporter(lambda m, lvl: None, dict, lambda: [], 0, led=Led("ACT", str(leds)), pending_failure=lambda: pending[0])
    r.check()
    assert r.health.state == "failed" and "halted" in (r.health.failure or "")
    assert (leds / "ACT" / "trigger").read_text() == "none" and (leds / "ACT" / "brightness").read_text().strip() == "255"
    pending.pop(0)
    r.check()
    assert r.health.state == "ok" and r.health.failure is None
    r.failed("refused")
    r.check()
    assert r.health.state == "failed" and r.health.failure == "refused"
