"""A backup knows whose it is: the node id and network are recorded (DEST/NODE), shown by
status, verify and the RPC, and another node's (or network's) backup is refused at start
with nothing in it written or deleted. The two recordings come from two different nodes."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Dict, Tuple

import pytest

import dbcompare
import driver
from driver import Halted
from helpers import cli, restore_to

A_ID = "036c3e4dc827c5507c0a1545c89222893186454994d7e364e4077278cd559635ed"
FILLER_ID = "033648beeb7431c82dc862793e7aaa1ccbca8c1c4ad7648d839b77f4d4aae9deaf"
REGTEST = "06226e46111a0b59caaf126043eb5bbf28c34f3a5e332a1fc7b2b73cf188910f"
TESTNET = "43497fd7f826957108f4a30fd9cec3aeba79972084e90ead01ea330900000000"


def tree(root: Path) -> Dict[str, Tuple[str, int, int, bytes]]:
    """Everything under root (root too): kind, mode, mtime in ns, and a file's bytes."""
    out = {}
    for p in [root, *sorted(root.rglob("*"))]:
        st = p.lstat()
        data = p.read_bytes() if p.is_file() and not p.is_symlink() else b""
        out[str(p.relative_to(root))] = ("dir" if p.is_dir() else "file", st.st_mode, st.st_mtime_ns, data)
    return out


def node_file(dest: Path) -> str:
    return (dest / "NODE").read_text()


def started_by_the_other_node(make_node, traces, dest: Path, mode: str, trace: str = "filler-A") -> driver.Node:
    """Node B, a fresh node of its own, started with `dest` as its destination: refused."""
    b = make_node(pibackup_mode=mode, pibackup_destination=str(dest))
    recs = driver.first_run(traces[trace])
    b.start([r for r in recs if r.pre_init])
    with pytest.raises(Halted):
        b.call(recs[9])
    return b


@pytest.mark.parametrize("mode", ["journal", "replica"])
def test_node_b_started_on_node_a_backup_is_refused_and_a_backup_stays_byte_for_byte(mode, make_node, traces, dest):
    a = make_node(pibackup_mode=mode)
    recs = traces["A"]
    a.start(recs[:9])
    a.calls(recs[9:80])
    assert node_file(dest) == f"pibackup node\nnode_id {A_ID}\ngenesis_hash {REGTEST}\nnetwork regtest\n"
    a.stop()
    before = tree(dest)
    time.sleep(0.01)  # an mtime written by B would differ from A's
    b = started_by_the_other_node(make_node, traces, dest, mode)
    log = b.log_text()
    assert A_ID in log and FILLER_ID in log and "regtest" in log, log
    assert "node id differ" in log and "Nothing in" in log
    assert tree(dest) == before, "node B wrote or deleted something in node A's backup"
    assert b.acknowledged == 9  # B's early calls only; the first after init was refused
    # A goes on with its own backup, which is whole.
    a2 = make_node(pibackup_mode=mode)
    a2.live.close()
    shutil.copy(a.live.path, a2.live.path)
    a2.live = driver.LiveDB(a2.live.path)
    a2.start()
    a2.calls(recs[80:120])
    a2.stop()
    out = dest.parent / "restored.sqlite3"
    r = restore_to(dest, out)
    assert r.returncode == 0, r.stderr
    assert dbcompare.backup_differences(a2.live.path, out) == []


def test_a_backup_of_another_network_is_refused(make_node, traces, dest):
    a = make_node()
    recs = traces["A"]
    a.start(recs[:9])
    a.calls(recs[9:40])
    a.stop()
    before = tree(dest)
    # The same node id on testnet: the recording with its genesis hash swapped.
    swapped = [driver.Record(r.seq, r.pre_init, r.data_version, tuple(w.replace(REGTEST, TESTNET) for w in r.writes)) for r in recs]
    b = make_node()
    b.start(swapped[:9])
    with pytest.raises(Halted):
        b.call(swapped[9])
    log = b.log_text()
    assert "network differ" in log and "on regtest" in log and "on testnet" in log, log
    assert tree(dest) == before


@pytest.mark.parametrize("mode", ["journal", "replica"])
def test_an_old_backup_without_node_file_is_told_from_its_data_and_refused_to_another_node(mode, make_node, traces, old_backups):
    dest = old_backups / mode
    assert not (dest / "NODE").exists()
    before = tree(dest)
    time.sleep(0.01)
    b = started_by_the_other_node(make_node, traces, dest, mode)
    log = b.log_text()
    assert A_ID in log and FILLER_ID in log and "from its newest data" in log, log
    assert tree(dest) == before


@pytest.mark.parametrize("mode", ["journal", "replica"])
def test_an_old_backup_is_continued_by_its_own_node_and_records_it(mode, make_node, traces, old_backups):
    dest = old_backups / mode
    node = make_node(pibackup_mode=mode, pibackup_destination=str(dest))
    node.live.close()
    shutil.copy(old_backups / f"{mode}-live.sqlite3", node.live.path)
    node.live = driver.LiveDB(node.live.path)
    recs = traces["A"]
    second = recs[len(driver.first_run(recs)) :]
    early = [r for r in second[:10] if r.pre_init]
    node.start(early)
    node.calls(second[len(early) : len(early) + 40])
    assert A_ID in node_file(dest)
    st = node.rpc("pibackup-status")
    assert st["node_id"] == A_ID and st["network"] == "regtest" and st["state"] == "ok", st
    node.stop()
    out = old_backups / "restored.sqlite3"
    r = restore_to(dest, out)
    assert r.returncode == 0, r.stderr
    assert dbcompare.backup_differences(node.live.path, out) == []


@pytest.mark.parametrize("mode", ["journal", "replica"])
def test_status_verify_and_rpc_show_the_node_id_and_network(mode, make_node, traces, dest):
    node = make_node(pibackup_mode=mode)
    node.start(traces["A"][:9])
    st = node.rpc("pibackup-status")
    assert st["node_id"] == A_ID and st["network"] == "regtest", st
    node.stop()
    for command in ("status", "verify"):
        r = cli(command, str(dest))
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"node id: {A_ID}" in r.stdout and "network: regtest" in r.stdout, r.stdout
    if mode == "journal":
        import json

        data = json.loads(cli("status", "--json", str(dest)).stdout)
        assert data["node_id"] == A_ID and data["network"] == "regtest"


def test_a_new_node_records_its_id_as_soon_as_lightningd_wrote_it(make_node, traces, dest):
    # lightningd writes node_id in its sixth call; init comes after the fifth here.
    recs = traces["A"]
    node = make_node()
    node.start(recs[:5])
    assert not (dest / "NODE").exists()
    assert node.rpc("pibackup-status")["node_id"] is None
    node.calls(recs[5:9])
    deadline = time.monotonic() + 60
    while not (dest / "NODE").exists() and time.monotonic() < deadline:
        time.sleep(0.2)  # the background thread looks every few seconds
    assert A_ID in node_file(dest)
    assert node.rpc("pibackup-status")["node_id"] == A_ID
    node.stop()


def test_node_file_that_names_another_node_refuses_and_verify_says_it_disagrees(make_node, traces, dest):
    node = make_node()
    node.start(traces["A"][:9])
    node.stop()
    text = node_file(dest).replace(A_ID, FILLER_ID)
    os.chmod(dest / "NODE", 0o600)
    (dest / "NODE").write_text(text)
    v = cli("verify", str(dest))
    assert v.returncode != 0 and "NODE names node " + FILLER_ID in v.stdout + v.stderr, v.stdout + v.stderr
    again = make_node()
    again.live.close()
    shutil.copy(node.live.path, again.live.path)
    again.live = driver.LiveDB(again.live.path)
    again.start()
    with pytest.raises(Halted):
        again.call(traces["A"][9])
    assert "(from NODE)" in again.log_text()


def test_a_shipped_copy_of_another_node_is_refused_naming_both_and_left_unchanged(sshd, make_node, traces, tmp_path):
    remote = tmp_path / "remote" / "copy"
    remote.parent.mkdir()
    a = make_node(pibackup_batch_seconds=0, pibackup_compact_ratio="0", **sshd.options(remote))
    a.start(traces["A"][:9])
    a.calls(traces["A"][9:40])
    since = time.time()
    deadline = time.monotonic() + 90
    while (a.rpc("pibackup-status")["shipping"].get("last_success") or 0) < since and time.monotonic() < deadline:
        time.sleep(0.2)
    a.stop()
    assert (remote / "HEAD").exists()
    before = tree(remote)
    b_dest = tmp_path / "b-usb" / "pibackup"
    b_dest.mkdir(parents=True)
    b = make_node(pibackup_destination=str(b_dest), pibackup_batch_seconds=0, **sshd.options(remote))
    recs = driver.first_run(traces["filler-A"])
    b.start([r for r in recs if r.pre_init])
    b.calls(recs[9:30])  # B's own backup goes on
    deadline = time.monotonic() + 90
    while b.rpc("pibackup-status")["shipping"]["state"] != "failing" and time.monotonic() < deadline:
        time.sleep(0.2)
    err = b.rpc("pibackup-status")["shipping"]["last_error"]
    assert f"it is the copy of node {A_ID}, and this backup is of node {FILLER_ID}" in err, err
    b.stop()
    assert tree(remote) == before


def test_another_nodes_generation_beside_this_nodes_node_file_is_refused(make_node, traces, dest, tmp_path):
    # Node B's backup directory, with node A's NODE put in it (files copied between sticks).
    b = make_node()
    recs = driver.first_run(traces["filler-A"])
    b.start([r for r in recs if r.pre_init])
    b.calls(recs[9:30])
    b.stop()
    a_dir = tmp_path / "a-usb" / "pibackup"
    a_dir.mkdir(parents=True)
    a = make_node(pibackup_destination=str(a_dir))
    a.start(traces["A"][:9])
    a.stop()
    shutil.copy(a_dir / "NODE", dest / "NODE")
    before = tree(dest)
    time.sleep(0.01)
    again = make_node(pibackup_destination=str(dest))
    again.live.close()
    shutil.copy(a.live.path, again.live.path)
    again.live = driver.LiveDB(again.live.path)
    again.start()
    with pytest.raises(Halted):
        again.call(traces["A"][9])
    log = again.log_text()
    assert "(from its newest data)" in log and FILLER_ID in log and A_ID in log, log
    assert tree(dest) == before
