"""pibackup-remote against a real lightningd: node A keeps a synchronous copy on another host
(`pibackup serve` behind a real sshd on 127.0.0.1) and pays B; A is killed, its whole
lightning directory and its stick thrown away; restored from the remote copy alone into a
fresh directory holding only A's hsm_secret, A starts, agrees with B on the balance and
pays again."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator

import pytest
from harness import PLUGIN, ROOT, Cluster, Node, open_channel, pay, wait_for
from test_cln_crash import balances_agree

from sshd import Sshd

pytestmark = pytest.mark.xdist_group("cln-remote")
SERVE = f"env PYTHONPATH={ROOT} {sys.executable} -m pibackup serve"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dict[str, object]]:
    base = tmp_path_factory.mktemp("cln-remote")
    cluster = Cluster(base)
    with contextlib.ExitStack() as stack:
        stack.callback(cluster.close)
        dest = base / "usb" / "pibackup"
        dest.mkdir(parents=True)
        sshd = stack.enter_context(contextlib.closing(Sshd(base / "sshd")))
        remote = base / "remote" / "A"
        options = {
            "important-plugin": str(PLUGIN),
            "pibackup-destination": str(dest),
            "pibackup-remote": sshd.target(remote),
            "pibackup-remote-port": sshd.port,
            "pibackup-remote-identity": sshd.identity,
            "pibackup-remote-known-hosts": sshd.known_hosts,
            "pibackup-remote-command": SERVE,
            "pibackup-remote-on-failure": "halt",
        }
        a = cluster.node("A", options)
        b = cluster.node("B")
        a.fund(3_000_000)
        open_channel(a, b, 2_000_000)
        yield {"a": a, "b": b, "dest": dest, "base": base, "sshd": sshd, "remote": remote}


def restore(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pibackup", "restore", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_a_pi_lost_after_paying_comes_back_from_the_remote_copy_alone(pair: Dict[str, object]) -> None:
    a, b, dest, base, sshd, remote = (pair[k] for k in ("a", "b", "dest", "base", "sshd", "remote"))
    assert isinstance(a, Node) and isinstance(b, Node) and isinstance(dest, Path) and isinstance(base, Path)
    assert isinstance(sshd, Sshd) and isinstance(remote, Path)
    wait_for("the remote copy to be in step", lambda: a.rpc.call("pibackup-status")["remote"][0]["state"] == "in step")
    for k in range(3):
        assert pay(a, b, 10_000_000, f"before-{k}")["status"] == "complete"
    wait_for("A and B to agree", lambda: balances_agree(a, b))
    # lightningd's static channel backup goes to the remote in the background: wait for it,
    # as a node runner would for the stick's copy; the channel state needs no waiting.
    live_recover = (a.net / "emergency.recover").read_bytes()
    wait_for("the remote's emergency.recover", lambda: (remote / "emergency.recover").exists()
             and (remote / "emergency.recover").read_bytes() == live_recover)
    secret = (a.net / "hsm_secret").read_bytes()
    a_id = a.id()
    a.kill()  # the Pi dies: no clean stop, nothing more reaches anything
    shutil.rmtree(a.dir)
    shutil.rmtree(dest)  # and its stick with it
    (a.dir / "regtest").mkdir(parents=True)
    (a.net / "hsm_secret").write_bytes(secret)
    os.chmod(a.net / "hsm_secret", 0o400)
    out = restore(sshd.target(remote), "--lightning-dir", str(a.dir), *sshd.cli_args())
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"node {a_id} on regtest" in out.stdout, out.stdout + out.stderr
    assert "the sending node was in step when last heard from" in out.stdout + out.stderr, out.stdout + out.stderr
    dest.mkdir(parents=True)  # a new stick for the new Pi; the remote directory stays the old copy's
    a.options["pibackup-remote"] = sshd.target(remote.parent / "A-new")
    a.start()
    assert a.id() == a_id
    wait_for("A and B to reconnect", lambda: a.channel(b)["peer_connected"] and b.channel(a)["peer_connected"])
    wait_for("A and B to agree on the balance", lambda: balances_agree(a, b))
    assert a.channel(b)["to_us_msat"] == 2_000_000_000 - 30_000_000
    assert pay(a, b, 7_000_000, "after-restore")["status"] == "complete"
    wait_for("A and B to agree after paying again", lambda: balances_agree(a, b))
