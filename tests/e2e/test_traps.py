"""Traps caught at start, each a warning in the log, the status line, the RPC and the LED: a
destination on the medium of lightningd's database, and pibackup loaded with plugin= (or a
plugins directory) instead of important-plugin=. The plugin's parent process stands in for
lightningd with lightningd's own command line (argv[0] "lightningd")."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

import driver
from helpers import received

SHIM = """import subprocess, sys
args = sys.argv[1:]
sys.exit(subprocess.call(args[args.index("--") + 1 :]))  # the plugin, with lightningd's pipes
"""


def as_lightningd(node: driver.Node, tmp_path: Path, *args: str) -> None:
    """Run the plugin as the child of a process whose command line is lightningd's `args`."""
    shim = tmp_path / "shim.py"
    shim.write_text(SHIM)
    node.plugin_prefix = ["bash", "-c", f'exec -a lightningd {sys.executable} {shim} "$@"', "bash", *args, "--"]


def same_medium(st: dict) -> list:
    return [w for w in st["warnings"] if "when that card or disk dies" in w]


def test_a_destination_on_the_live_databases_file_system_warns_everywhere(make_node, traces, dest, leds, notify_socket):
    sock, path = notify_socket
    node = make_node(pibackup_allow_same_medium="false", pibackup_led="ACT", pibackup_led_dir=str(leds))
    node.plugin_env = {"NOTIFY_SOCKET": path}
    node.start(traces["A"][:9])
    st = node.rpc("pibackup-status")
    [w] = same_medium(st)
    assert st["state"] == "warning" and str(dest) in w and "on the same file system as" in w and str(node.live.path) in w
    assert "pibackup-allow-same-medium=true" in w
    assert (leds / "ACT" / "trigger").read_text() == "timer"
    assert any("WARNING: the backup in" in m for m in received(sock, "WARNING"))
    assert sum(1 for _, m in node.plugin.logs if "when that card or disk dies" in m) == 1
    node.calls(traces["A"][9:20])  # a warning, never a halt
    node.stop()


def test_a_bind_mount_of_a_directory_beside_the_database_is_the_same_medium(make_node, traces, tmp_path):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("bind mounts need root")
    node = make_node(pibackup_allow_same_medium="false")
    beside = node.netdir.parent / "backup-on-the-card"
    beside.mkdir()
    mnt = tmp_path / "media" / "usb"
    mnt.mkdir(parents=True)
    import subprocess

    subprocess.run(["mount", "--bind", str(beside), str(mnt)], check=True)
    try:
        node.options["pibackup-destination"] = str(mnt)
        node.start(traces["A"][:9])
        assert same_medium(node.rpc("pibackup-status")), "a bind mount hides the card behind another path"
        node.stop()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_destination_on_another_medium_gives_no_warning(make_node, traces):
    if not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
        pytest.skip("no /dev/shm to stand in for another medium")
    other = Path(tempfile.mkdtemp(prefix="pibackup-traps-", dir="/dev/shm"))
    try:
        node = make_node(pibackup_allow_same_medium="false", pibackup_destination=str(other))
        node.start(traces["A"][:9])
        st = node.rpc("pibackup-status")
        assert same_medium(st) == [] and st["state"] == "ok", st
        node.stop()
    finally:
        shutil.rmtree(other)


def test_allow_same_medium_silences_it(make_node, traces):
    node = make_node(pibackup_allow_same_medium="true")
    node.start(traces["A"][:9])
    assert same_medium(node.rpc("pibackup-status")) == []
    node.stop()


def test_plugin_instead_of_important_plugin_on_the_command_line_warns(make_node, traces, tmp_path, leds):
    node = make_node(pibackup_led="ACT", pibackup_led_dir=str(leds))
    as_lightningd(node, tmp_path, f"--lightning-dir={node.lightning_dir}", "--network=regtest", f"--plugin={driver.PLUGIN}")
    node.start(traces["A"][:9])
    st = node.rpc("pibackup-status")
    [w] = [w for w in st["warnings"] if "important-plugin" in w]
    assert "loaded with plugin= in the command line" in w and "a silent gap" in w, w
    assert f"important-plugin={driver.PLUGIN}" in w
    assert st["state"] == "warning" and (leds / "ACT" / "trigger").read_text() == "timer"
    assert w in node.plugin.log_text()
    node.stop()


def test_plugin_in_the_config_file_warns_and_names_it(make_node, traces, tmp_path):
    node = make_node()
    config = node.lightning_dir / "config"
    config.write_text(f"network=regtest\nplugin={driver.PLUGIN}\npibackup-destination=/x\n")
    as_lightningd(node, tmp_path, f"--lightning-dir={node.lightning_dir}")
    node.start(traces["A"][:9])
    warnings = node.rpc("pibackup-status")["warnings"]
    assert any(f"loaded with plugin= in {config}" in w for w in warnings), warnings
    node.stop()


def test_a_plugins_directory_warns(make_node, traces, tmp_path):
    node = make_node()
    as_lightningd(node, tmp_path, f"--plugin-dir={driver.PLUGIN.parent}")
    node.start(traces["A"][:9])
    assert any("plugin-dir= (a plugins directory)" in w for w in node.rpc("pibackup-status")["warnings"])
    node.stop()


@pytest.mark.parametrize("where", ["command line", "config", "included config"])
def test_important_plugin_gives_no_warning(where, make_node, traces, tmp_path):
    node = make_node()
    line = f"important-plugin={driver.PLUGIN}"
    args = [f"--lightning-dir={node.lightning_dir}"]
    if where == "command line":
        args.append("--" + line)
    elif where == "config":
        (node.lightning_dir / "config").write_text(line + "\n")
    else:
        (node.lightning_dir / "plugins.conf").write_text(line + "\n")
        (node.lightning_dir / "config").write_text("include plugins.conf\n")
    as_lightningd(node, tmp_path, *args)
    node.start(traces["A"][:9])
    st = node.rpc("pibackup-status")
    assert st["warnings"] == [] and st["state"] == "ok", st
    node.stop()


def test_not_named_anywhere_warns(make_node, traces, tmp_path):
    node = make_node()
    as_lightningd(node, tmp_path, f"--lightning-dir={node.lightning_dir}")
    node.start(traces["A"][:9])
    assert any("do not load pibackup with important-plugin=" in w for w in node.rpc("pibackup-status")["warnings"])
    node.stop()


def test_a_destination_on_another_btrfs_subvolume_of_the_databases_disk_warns(traces, tmp_path):
    """Each subvolume has an st_dev of its own; the disk under both is one."""
    import subprocess

    from helpers import LoopStick

    stick = LoopStick(tmp_path / "btrfs", "btrfs")
    node = None
    try:
        card, backup = stick.mnt / "card", stick.mnt / "backup"
        for sub in (card, backup):
            subprocess.run(["btrfs", "subvolume", "create", str(sub)], check=True, capture_output=True)
        assert os.stat(card).st_dev != os.stat(backup).st_dev
        node = driver.Node(card / "node", {"pibackup-destination": str(backup), "pibackup-segment-size": "128K"})
        node.start(traces["A"][:9])
        [w] = same_medium(node.rpc("pibackup-status"))
        assert "on the same disk (" in w and str(backup) in w, w
        node.stop()
    finally:
        if node is not None:
            if node.plugin is not None:
                node.plugin.proc.kill()
                node.plugin.proc.wait()
            node.live.close()
        stick.close()
