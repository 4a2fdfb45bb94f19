"""The synchronous copy (pibackup-remote) through a real sshd on 127.0.0.1 to the real
`pibackup serve`, driven with the recordings, restored from the remote and compared with
the live database."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest

import dbcompare
import driver
from driver import REPO
from helpers import cli, received, restore_to
from sshd import Sshd

SERVE = f"env PYTHONPATH={REPO} {sys.executable} -m pibackup serve"


def remote_options(sshd: Sshd, *remotes: Path, **extra: object) -> Dict[str, object]:
    opts: Dict[str, object] = {
        "pibackup-remote": [sshd.target(r) for r in remotes],
        "pibackup-remote-port": sshd.port,
        "pibackup-remote-identity": sshd.identity,
        "pibackup-remote-known-hosts": sshd.known_hosts,
        "pibackup-remote-command": SERVE,
    }
    opts.update({k.replace("_", "-"): v for k, v in extra.items()})
    return opts


def remote_status(node: driver.Node) -> List[Dict[str, Any]]:
    return node.rpc("pibackup-status")["remote"]


def wait_in_step(node: driver.Node, timeout: float = 120.0) -> List[Dict[str, Any]]:
    deadline = time.monotonic() + timeout
    st: List[Dict[str, Any]] = []
    while time.monotonic() < deadline:
        st = remote_status(node)
        if all(r["state"] == "in step" for r in st):
            return st
        time.sleep(0.1)
    raise AssertionError(f"the remote never got in step: {st}\n{node.log_text()}")


def receiver_pids(remote: Path) -> List[int]:
    """The `pibackup serve` processes of this test's remote directory (its path is unique)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in argv and str(remote).encode() in argv:
            out.append(int(d.name))
    return out


def kill_receivers(remote: Path, sig: int = signal.SIGKILL) -> List[int]:
    pids = receiver_pids(remote)
    for pid in pids:
        os.kill(pid, sig)
    return pids


def restore_remote(sshd: Sshd, remote: Path, out: Path, *extra: str):
    return cli("restore", sshd.target(remote), str(out), *sshd.cli_args(), *extra)


@pytest.mark.parametrize("on_failure", ["halt", "continue-degraded"])
def test_the_remote_copy_restores_to_the_live_db_from_anywhere_and_on_the_host(on_failure, sshd, traces, make_node, dest, tmp_path):
    remote = tmp_path / "remote" / "node1"
    node = make_node(pibackup_compact_ratio="0", **remote_options(sshd, remote, pibackup_remote_on_failure=on_failure))
    recs = driver.first_run(traces["A"])
    early = [r for r in recs if r.pre_init]
    node.start(early)
    wait_in_step(node)
    node.calls(recs[len(early) :])
    st = wait_in_step(node)
    assert st[0]["problem"] is None and st[0]["last_ack"] is not None
    assert node.stop() == 0
    assert "error" not in [lvl for lvl, _ in node.all_logs], node.log_text()
    assert len(list(remote.glob("gen-*/seg-*.pbj"))) > 1, "the test must cover a roll-over"
    for name in ("NODE", "emergency.recover"):  # the node's files beside the journal, as in a shipped copy
        if (dest / name).exists():
            assert (remote / name).read_bytes() == (dest / name).read_bytes(), name
    assert (dest / "NODE").exists(), "the test must cover the node's files"

    out = tmp_path / "from-anywhere.sqlite3"
    r = restore_remote(sshd, remote, out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "the sending node was in step until it stopped when last heard from" in r.stdout, r.stdout + r.stderr
    assert dbcompare.backup_differences(node.live.path, out, ("utxoset",)) == []
    on_host = tmp_path / "on-the-host.sqlite3"
    r = restore_to(remote, on_host)
    assert r.returncode == 0, r.stdout + r.stderr
    assert dbcompare.backup_differences(node.live.path, on_host, ("utxoset",)) == []


def assert_remote_holds_every_acknowledged(remote: Path, node: driver.Node, tmp_path: Path, name: str, *key: str) -> None:
    """The remote copy, restored on its host, is the live database, or the live database
    plus the one transaction in flight when it was cut off (lightningd sends that again)."""
    out = tmp_path / f"{name}.sqlite3"
    r = restore_to(remote, out, *key)
    assert r.returncode == 0, r.stdout + r.stderr
    assert dbcompare.backup_differences(node.live.path, out, ("utxoset",)) == [], r.stdout + r.stderr


CRYPT_MAGIC = b"PBKCRYPT"


def test_an_encrypted_remote_copy_holds_only_ciphertext_and_restores_with_the_key(sshd, keyfile, traces, make_node, tmp_path):
    remote = tmp_path / "remote" / "node1"
    node = make_node(pibackup_compact_ratio="0", **remote_options(sshd, remote, pibackup_remote_encrypt_key=str(keyfile)))
    recs = driver.first_run(traces["A"])[:900]
    early = [r for r in recs if r.pre_init]
    node.start(early)
    node.calls(recs[len(early) :])
    wait_in_step(node)
    assert node.stop() == 0
    files = [p for p in remote.rglob("*") if p.is_file() and p.name != "PIBACKUP" and not p.name.startswith(".")]
    assert any(p.name.startswith("snapshot-") for p in files) or len(list(remote.glob("gen-*/seg-*.pbj"))) > 1
    for p in files:
        data = p.read_bytes()
        assert data.startswith(CRYPT_MAGIC), p
        for plain in (b"PIBKJRNL", b"SQLite format 3", b"CREATE TABLE", b"INSERT INTO", b"pibackup="):
            assert plain not in data[8:], f"{p} shows {plain!r}: nothing readable may leave the Pi"
    r = restore_remote(sshd, remote, tmp_path / "nokey.sqlite3")
    assert r.returncode == 1 and "give the key file with --key" in r.stderr, r.stderr
    out = tmp_path / "with-key.sqlite3"
    r = restore_remote(sshd, remote, out, "--key", str(keyfile))
    assert r.returncode == 0, r.stdout + r.stderr
    assert dbcompare.backup_differences(node.live.path, out, ("utxoset",)) == []


def test_halt_refuses_the_first_critical_transaction_when_the_remote_is_down_at_start(sshd, traces, make_node, tmp_path):
    remote = tmp_path / "remote" / "node1"
    sshd.stop()
    node = make_node(**remote_options(sshd, remote, pibackup_remote_on_failure="halt", pibackup_remote_timeout=2))
    recs = driver.first_run(traces["A"])
    early = [r for r in recs if r.pre_init]
    node.start(early)
    with pytest.raises(driver.Halted):
        node.calls(recs[len(early) :])
    log = node.log_text()
    assert f"remote copy {sshd.target(remote)} cannot take this critical transaction" in log, log
    assert "refuses connections: is sshd running there" in log, log


def test_continue_degraded_goes_on_through_an_outage_and_catches_the_remote_up(sshd, traces, make_node, tmp_path, leds, notify_socket):
    remote = tmp_path / "remote" / "node1"
    opts = remote_options(sshd, remote, pibackup_remote_timeout=3, pibackup_led="ACT", pibackup_led_dir=str(leds))
    node = make_node(pibackup_compact_ratio="0", **opts)
    sock, path = notify_socket
    node.plugin_env = {"NOTIFY_SOCKET": path}
    recs = driver.first_run(traces["A"])
    early = [r for r in recs if r.pre_init]
    node.start(early)
    third = len(recs) // 3
    node.calls(recs[len(early) : third])
    wait_in_step(node)
    sshd.stop()  # no new sessions; the open one is ended by ending its receiver
    assert kill_receivers(remote), "the receiver must have been running"
    node.calls(recs[third : 2 * third])  # every call answered: the node goes on
    st = remote_status(node)[0]
    assert st["state"] != "in step" and st["problem"], st
    warnings = node.rpc("pibackup-status")["warnings"]
    assert any(f"remote copy {sshd.target(remote)} is not in step" in w for w in warnings), warnings
    assert (leds / "ACT" / "trigger").read_text() == "timer", "the LED blinks the warning"
    assert any("remote copy" in line and "not in step" in line for line in received(sock, "not in step")), "the status line says so"
    sshd.start()
    wait_in_step(node)
    assert_remote_holds_every_acknowledged(remote, node, tmp_path, "after-outage")
    node.calls(recs[2 * third :])
    wait_in_step(node)
    assert node.stop() == 0
    assert_remote_holds_every_acknowledged(remote, node, tmp_path, "at-the-end")
    assert "caught up and in step again" in node.log_text()


def test_a_remote_segment_that_differs_from_the_local_one_is_set_aside_and_sent_again(sshd, traces, make_node, tmp_path):
    # Frames go to the receiver while the local sync runs: a Pi dying in between can leave the
    # remote holding what the stick lost, and the journal then goes on differently. Stood in
    # for by another backup's segment of the same name in the remote copy.
    recs = driver.first_run(traces["A"])
    early = [r for r in recs if r.pre_init]
    other_dest = tmp_path / "other"
    other_dest.mkdir()
    other = make_node(**{"pibackup-destination": str(other_dest), "pibackup-segment-size": "1M"})
    other.start(early)
    other.calls(recs[len(early) : 300])
    assert other.stop() == 0
    remote = tmp_path / "remote" / "node1"
    node = make_node(pibackup_segment_size="1M", pibackup_compact_ratio="0", **remote_options(sshd, remote))
    node.start(early)
    wait_in_step(node)
    node.calls(recs[len(early) : 400])
    wait_in_step(node)
    assert node.stop() == 0
    seg = remote / "gen-000001" / "seg-000001.pbj"
    seg.write_bytes((other_dest / "gen-000001" / "seg-000001.pbj").read_bytes())
    node.start([])
    node.calls(recs[400:500])
    wait_in_step(node)
    assert node.stop() == 0
    kept = list(seg.parent.glob("seg-000001.pbj.diverged-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == (other_dest / "gen-000001" / "seg-000001.pbj").read_bytes()
    assert_remote_holds_every_acknowledged(remote, node, tmp_path, "after-divergence")


def test_two_remotes_side_by_side_one_failing_under_continue_degraded(sshd, traces, make_node, tmp_path):
    first, second = tmp_path / "remote" / "one", tmp_path / "remote" / "two"
    node = make_node(pibackup_compact_ratio="0", **remote_options(sshd, first, second, pibackup_remote_timeout=2))
    recs = driver.first_run(traces["A"])
    early = [r for r in recs if r.pre_init]
    node.start(early)
    wait_in_step(node)
    half = len(recs) // 2
    node.calls(recs[len(early) : half])
    stopped = kill_receivers(second, signal.SIGSTOP)
    node.calls(recs[half:])  # the second one hangs: the node goes on with the first and the stick
    states = {r["target"]: r for r in remote_status(node)}
    assert states[sshd.target(first)]["state"] == "in step", states
    assert states[sshd.target(second)]["problem"], states
    assert_remote_holds_every_acknowledged(first, node, tmp_path, "first")
    for pid in stopped:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass  # ended with its session meanwhile
    wait_in_step(node)
    assert node.stop() == 0
    assert_remote_holds_every_acknowledged(second, node, tmp_path, "second")


def test_an_encrypted_remote_segment_whose_last_chunk_differs_is_set_aside_and_sent_again(sshd, keyfile, traces, make_node, tmp_path):
    # The receiver cannot read an encrypted segment; the sender encrypts its own bytes at the
    # last chunk's place again and compares. A last chunk that is not what the stick holds
    # (the Pi died between the remote's sync and its own) is stood in for by one byte changed.
    recs = driver.first_run(traces["A"])
    early = [r for r in recs if r.pre_init]
    remote = tmp_path / "remote" / "node1"
    opts = remote_options(sshd, remote, pibackup_remote_encrypt_key=str(keyfile))
    node = make_node(pibackup_segment_size="1M", pibackup_compact_ratio="0", **opts)
    node.start(early)
    wait_in_step(node)
    node.calls(recs[len(early) : 350])
    wait_in_step(node)
    assert node.stop() == 0
    node.start([])  # a restart with nothing changed goes on with the same file: nothing set aside
    node.calls(recs[350:400])
    wait_in_step(node)
    assert node.stop() == 0
    seg = sorted((remote / "gen-000001").glob("seg-*.pbj"))[-1]  # each start of the writer begins a segment
    assert not list(seg.parent.glob("*.diverged-*"))
    data = bytearray(seg.read_bytes())
    data[-5] ^= 0x40
    seg.write_bytes(bytes(data))
    node.start([])
    node.calls(recs[400:500])
    wait_in_step(node)
    assert node.stop() == 0
    kept = list(seg.parent.glob(f"{seg.name}.diverged-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == bytes(data), sorted(p.name for p in seg.parent.iterdir())
    assert_remote_holds_every_acknowledged(remote, node, tmp_path, "after-divergence", "--key", str(keyfile))
