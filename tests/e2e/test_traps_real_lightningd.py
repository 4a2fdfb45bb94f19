"""The start-time checks against a real lightningd (tests/cln/harness.py): its own command
line and config file read for how pibackup is loaded, and the node id and network pibackup
reports equal to lightningd's own. Skipped without the Core Lightning build."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cln"))

from harness import PLUGIN, Cluster, wait_for  # noqa: E402


def pibackup_status(node) -> dict:
    return node.rpc.call("pibackup-status")


def test_real_lightningd_important_plugin_plain_plugin_and_the_node_id(tmp_path):
    cluster = Cluster(tmp_path / "cluster")
    try:
        dest = tmp_path / "stick" / "pibackup"
        dest.mkdir(parents=True)
        a = cluster.node("a", {"important-plugin": str(PLUGIN), "pibackup-destination": str(dest)})
        st = wait_for("pibackup's status", lambda: pibackup_status(a) if pibackup_status(a).get("node_id") else None)
        info = a.rpc.getinfo()
        assert st["node_id"] == info["id"] and st["network"] == "regtest", st
        assert not any("important-plugin" in w for w in st["warnings"]), st["warnings"]
        # The test's stick shares the disk with lightningd's database: the same-medium warning.
        assert any("when that card or disk dies" in w for w in st["warnings"]), st["warnings"]
        assert (dest / "NODE").read_text().splitlines()[1] == f"node_id {info['id']}"
        wait_for(  # chanbackup writes it at its own start; the copy follows within seconds
            "emergency.recover in the backup",
            lambda: (dest / "emergency.recover").exists()
            and (dest / "emergency.recover").read_bytes() == (a.net / "emergency.recover").read_bytes(),
        )
        a.kill()  # a clean stop waits out lightningd's 30 s for plugins: not what is tested here

        # The same node, pibackup named by plain plugin= in its config file.
        (a.dir / "config").write_text(f"plugin={PLUGIN}\npibackup-destination={dest}\npibackup-allow-same-medium=true\n")
        a.options = {}
        a.start()
        warnings = wait_for("the plugin= warning", lambda: [w for w in pibackup_status(a)["warnings"] if "important-plugin" in w])
        assert warnings == [w for w in pibackup_status(a)["warnings"]], "only the plugin= warning: same medium allowed"
        assert f"loaded with plugin= in {a.dir / 'config'}" in warnings[0], warnings
    finally:
        cluster.close()
