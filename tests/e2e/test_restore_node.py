"""`restore --lightning-dir` on a backup of a real recording (no lightningd needed): each
refusal writes nothing and says what to do; what cannot be checked is said; the files land
where lightningd looks for them. tests/cln runs the same against a real lightningd."""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
from pathlib import Path
from typing import Dict, Tuple

import pytest

import dbcompare
import driver
from helpers import cli

MNEMONIC = b"hospital wide weird range fun march merry utility cupboard room spatial erase"


@pytest.fixture(scope="module")
def backup(tmp_path_factory, traces) -> Tuple[Path, Path, str]:
    """A backup of trace A, its live database, and the node id in it."""
    root = tmp_path_factory.mktemp("backup")
    dest = root / "usb"
    dest.mkdir()
    node = driver.Node(root, {"pibackup-destination": str(dest), "pibackup-compact-ratio": "0"})
    driver.run_sessions(node, traces["A"])
    node.live.close()
    row = sqlite3.connect(node.live.path).execute("SELECT blobval FROM vars WHERE name='node_id'").fetchone()
    return dest, node.live.path, bytes(row[0]).hex()


def lightning_dir(tmp_path: Path, hsm_secret: bytes | None = None) -> Path:
    d = tmp_path / "lightning"
    (d / "regtest").mkdir(parents=True)
    if hsm_secret is not None:
        (d / "regtest" / "hsm_secret").write_bytes(hsm_secret)
    return d


def tree(root: Path) -> Dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"" for p in sorted(root.rglob("*"))}


def test_without_hsm_secret_the_node_is_restored_and_the_message_says_which_one_it_needs(backup, tmp_path):
    dest, live, node_id = backup
    d = lightning_dir(tmp_path)
    r = cli("restore", str(dest), "--lightning-dir", str(d))
    assert r.returncode == 0, r.stderr
    assert f"node {node_id} on regtest" in r.stdout
    assert "has no hsm_secret" in r.stderr and node_id in r.stderr and "lightning-hsmtool" in r.stderr
    db = d / "regtest" / "lightningd.sqlite3"
    assert dbcompare.backup_differences(live, db) == []
    assert oct(db.stat().st_mode & 0o777) == "0o600"
    assert sorted(os.listdir(d)) == ["regtest"]  # the staging directory is gone
    again = cli("restore", str(dest), "--lightning-dir", str(d))
    assert again.returncode == 1 and "already holds lightningd.sqlite3" in again.stderr and "--force" in again.stderr
    forced = cli("restore", str(dest), "--lightning-dir", str(d), "--force")
    assert forced.returncode == 0, forced.stderr
    assert dbcompare.backup_differences(live, db) == []


def test_the_network_directory_is_made_when_missing(backup, tmp_path):
    dest, live, _ = backup
    d = tmp_path / "empty"
    d.mkdir()
    r = cli("restore", str(dest), "--lightning-dir", str(d))
    assert r.returncode == 0, r.stderr
    assert dbcompare.backup_differences(live, d / "regtest" / "lightningd.sqlite3") == []


@pytest.mark.parametrize("kind", ["plain", "mnemonic"])
def test_another_nodes_hsm_secret_is_refused_naming_both_ids(backup, tmp_path, kind):
    dest, _, node_id = backup
    secret = os.urandom(32) if kind == "plain" else bytes(32) + MNEMONIC
    d = lightning_dir(tmp_path, secret)
    before = tree(d)
    r = cli("restore", str(dest), "--lightning-dir", str(d))
    assert r.returncode == 1
    assert "another node's" in r.stderr and node_id in r.stderr and "nothing was written" in r.stderr
    other = r.stderr.split("gives node id ")[1][:66]
    assert other != node_id and len(bytes.fromhex(other)) == 33
    assert tree(d) == before


@pytest.mark.parametrize(
    "secret, said",
    [(os.urandom(73), "is encrypted with a passphrase"), (b"\x07" * 32 + MNEMONIC, "is a mnemonic with a passphrase")],
    ids=["encrypted", "mnemonic-with-passphrase"],
)
def test_an_hsm_secret_that_cannot_be_checked_is_said_so(backup, tmp_path, secret, said):
    dest, _, _ = backup
    d = lightning_dir(tmp_path, secret)
    r = cli("restore", str(dest), "--lightning-dir", str(d))
    assert r.returncode == 0, r.stderr
    assert said in r.stderr and "cannot check" in r.stderr


def test_the_wrong_network_and_an_unknown_one_are_refused(backup, tmp_path):
    dest, _, _ = backup
    d = lightning_dir(tmp_path)
    before = tree(d)
    r = cli("restore", str(dest), "--lightning-dir", str(d), "--network", "bitcoin")
    assert r.returncode == 1 and "on regtest, not bitcoin" in r.stderr and "--network regtest" in r.stderr
    r = cli("restore", str(dest), "--lightning-dir", str(d), "--network", "liquid")
    assert r.returncode == 1 and "not one lightningd knows" in r.stderr
    assert tree(d) == before


def test_a_running_lightningd_is_refused(backup, tmp_path):
    dest, _, _ = backup
    d = lightning_dir(tmp_path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(d / "regtest" / "lightning-rpc"))
        s.listen()
        r = cli("restore", str(dest), "--lightning-dir", str(d))
    assert r.returncode == 1 and "lightningd is running" in r.stderr
    assert not (d / "regtest" / "lightningd.sqlite3").exists()


def test_emergency_recover_comes_along_and_a_damaged_one_is_left_out(backup, tmp_path):
    dest, _, _ = backup
    src = tmp_path / "with-recover"
    shutil.copytree(dest, src)
    data = os.urandom(24 + 17 + 300)  # the shape of lightningd's file: secretstream header, message, tag
    (src / "emergency.recover").write_bytes(data)
    d = lightning_dir(tmp_path)
    r = cli("restore", str(src), "--lightning-dir", str(d))
    assert r.returncode == 0, r.stderr
    assert (d / "regtest" / "emergency.recover").read_bytes() == data
    assert oct((d / "regtest" / "emergency.recover").stat().st_mode & 0o777) == "0o400"
    (src / "emergency.recover").write_bytes(b"short")
    d2 = tmp_path / "second"
    d2.mkdir()
    r = cli("restore", str(src), "--lightning-dir", str(d2))
    assert r.returncode == 0 and "emergency.recover is damaged" in r.stderr, r.stderr
    assert not (d2 / "regtest" / "emergency.recover").exists()


def test_output_db_and_lightning_dir_go_one_at_a_time(backup, tmp_path):
    dest, _, _ = backup
    r = cli("restore", str(dest), str(tmp_path / "x.sqlite3"), "--lightning-dir", str(tmp_path))
    assert r.returncode == 2 and "not both" in r.stderr
    r = cli("restore", str(dest))
    assert r.returncode == 2 and "give OUTPUT_DB, or --lightning-dir DIR" in r.stderr
    r = cli("restore", str(dest), str(tmp_path / "x.sqlite3"), "--network", "regtest")
    assert r.returncode == 2 and "--network goes with --lightning-dir" in r.stderr
    assert not (tmp_path / "x.sqlite3").exists()


def test_a_replica_mode_backup_restores_a_node_the_same_way(traces, tmp_path):
    dest = tmp_path / "usb"
    dest.mkdir()
    node = driver.Node(tmp_path / "node", {"pibackup-destination": str(dest), "pibackup-mode": "replica"})
    driver.run_sessions(node, traces["A"])
    node.live.close()
    d = lightning_dir(tmp_path, os.urandom(32))
    refused = cli("restore", str(dest), "--lightning-dir", str(d))
    assert refused.returncode == 1 and "another node's" in refused.stderr
    (d / "regtest" / "hsm_secret").unlink()
    r = cli("restore", str(dest), "--lightning-dir", str(d))
    assert r.returncode == 0, r.stderr
    assert "from the replica" in r.stdout
    assert dbcompare.backup_differences(node.live.path, d / "regtest" / "lightningd.sqlite3") == []


def test_a_killed_restores_staging_directory_is_removed_by_the_next(backup, tmp_path):
    dest, _, _ = backup
    d = lightning_dir(tmp_path)
    gone = subprocess.Popen(["true"])
    gone.wait()  # its pid is surely not running any more
    stale = d / f".pibackup-restore-{gone.pid}-abc"
    stale.mkdir()
    (stale / "lightningd.sqlite3.pibackup-tmp").write_bytes(b"half a database")
    r = cli("restore", str(dest), "--lightning-dir", str(d))
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(d)) == ["regtest"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: restores for another user, as `sudo pibackup restore` does")
def test_run_as_root_the_files_belong_to_the_lightning_dirs_owner(backup, tmp_path):
    dest, _, _ = backup
    d = tmp_path / "bitcoin-home"
    d.mkdir()
    os.chown(d, 65534, 65534)  # nobody, standing in for the node's user
    src = tmp_path / "with-recover"
    shutil.copytree(dest, src)
    (src / "emergency.recover").write_bytes(os.urandom(24 + 17 + 100))
    r = cli("restore", str(src), "--lightning-dir", str(d))
    assert r.returncode == 0, r.stderr
    for p in (d / "regtest", d / "regtest" / "lightningd.sqlite3", d / "regtest" / "emergency.recover"):
        assert (p.stat().st_uid, p.stat().st_gid) == (65534, 65534), p
