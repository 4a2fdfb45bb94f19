"""`pibackup restore BACKUP --lightning-dir DIR` against a real lightningd: a node whose whole
lightning directory is gone comes back on a fresh one holding only its hsm_secret, agrees
with its peer and pays again; another node's hsm_secret, the wrong network and a directory
that already holds a database are refused, and nothing is written."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, Tuple

import pytest
from harness import PLUGIN, ROOT, Cluster, Node, open_channel, pay, wait_for
from test_cln_crash import balances_agree, copy_in_step

from dbcompare import differences
from sshd import Sshd


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dict[str, object]]:
    base = tmp_path_factory.mktemp("cln-new-pi")
    cluster = Cluster(base)
    with contextlib.ExitStack() as stack:
        stack.callback(cluster.close)
        dest = base / "usb" / "pibackup"
        dest.mkdir(parents=True)
        sshd = stack.enter_context(contextlib.closing(Sshd(base / "sshd")))
        key = base / "ship.key"
        made = subprocess.run([sys.executable, "-m", "pibackup", "keygen", str(key)], cwd=ROOT, capture_output=True, text=True)
        assert made.returncode == 0, made.stderr
        remote = base / "remote" / "A"
        remote.parent.mkdir()
        ship = sshd.options(remote, pibackup_ship_encrypt_key=str(key))
        a = cluster.node("A", {"important-plugin": str(PLUGIN), "pibackup-destination": str(dest), **ship})
        b = cluster.node("B")
        a.fund(3_000_000)
        open_channel(a, b, 2_000_000)
        assert pay(a, b, 50_000_000, "before")["status"] == "complete"
        wait_for("A and B to agree", lambda: balances_agree(a, b))
        yield {"cluster": cluster, "a": a, "b": b, "dest": dest, "base": base, "sshd": sshd, "remote": remote, "key": key}


def restore(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pibackup", "restore", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def tree(root: Path) -> Dict[str, bytes]:
    """Every file under root with its bytes, and every directory: to prove nothing was written."""
    out: Dict[str, bytes] = {}
    for dirpath, dirs, files in os.walk(root):
        for d in dirs:
            out[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = b""
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = Path(p).read_bytes() if os.path.isfile(p) else b"(not a file)"
    return out


def fresh_dir(base: Path, name: str, hsm_secret: bytes | None) -> Path:
    d = base / name
    (d / "regtest").mkdir(parents=True)
    if hsm_secret is not None:
        (d / "regtest" / "hsm_secret").write_bytes(hsm_secret)
        os.chmod(d / "regtest" / "hsm_secret", 0o400)
    return d


def nodes(pair: Dict[str, object]) -> Tuple[Node, Node, Path, Path]:
    a, b, dest, base = pair["a"], pair["b"], pair["dest"], pair["base"]
    assert isinstance(a, Node) and isinstance(b, Node) and isinstance(dest, Path) and isinstance(base, Path)
    return a, b, dest, base


def test_another_nodes_hsm_secret_is_refused_naming_both_ids(pair: Dict[str, object]) -> None:
    a, b, dest, base = nodes(pair)
    d = fresh_dir(base, "with-b-secret", (b.net / "hsm_secret").read_bytes())
    before = tree(d)
    out = restore(str(dest), "--lightning-dir", str(d))
    assert out.returncode == 1, out.stdout + out.stderr
    assert a.id() in out.stderr and b.id() in out.stderr, out.stderr
    assert "another node's" in out.stderr and "nothing was written" in out.stderr
    assert tree(d) == before


def test_wrong_network_is_refused(pair: Dict[str, object]) -> None:
    a, _, dest, base = nodes(pair)
    d = fresh_dir(base, "wrong-network", (a.net / "hsm_secret").read_bytes())
    (d / "testnet").mkdir()
    before = tree(d)
    out = restore(str(dest), "--lightning-dir", str(d), "--network", "testnet")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "on regtest, not testnet" in out.stderr and "--network regtest" in out.stderr, out.stderr
    assert tree(d) == before


def test_a_running_node_and_an_existing_database_are_refused(pair: Dict[str, object]) -> None:
    a, _, dest, _ = nodes(pair)
    before = sorted(os.listdir(a.dir)), sorted(os.listdir(a.net))
    out = restore(str(dest), "--lightning-dir", str(a.dir))
    assert out.returncode == 1 and "lightningd is running" in out.stderr, out.stderr
    assert (sorted(os.listdir(a.dir)), sorted(os.listdir(a.net))) == before


def test_without_hsm_secret_it_restores_and_says_which_one_lightningd_needs(pair: Dict[str, object]) -> None:
    a, _, dest, base = nodes(pair)
    d = fresh_dir(base, "no-secret", None)
    out = restore(str(dest), "--lightning-dir", str(d))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "has no hsm_secret" in out.stderr and a.id() in out.stderr and "lightning-hsmtool" in out.stderr
    assert (d / "regtest" / "lightningd.sqlite3").exists()
    again = restore(str(dest), "--lightning-dir", str(d))
    assert again.returncode == 1 and "--force" in again.stderr
    # What the message warns of: lightningd given another node's hsm_secret will not run on it.
    b, cluster = pair["b"], pair["cluster"]
    assert isinstance(b, Node) and isinstance(cluster, Cluster)
    (d / "regtest" / "hsm_secret").write_bytes((b.net / "hsm_secret").read_bytes())
    wrong = cluster.node("no-secret", start=False)
    wrong.start(wait=False)
    assert wrong.exit_code() != 0
    log = wrong.tail(400)
    assert "node_id does not match HSM" in log and a.id() in log and b.id() in log, log


def test_from_a_shipped_copy_on_a_new_pi_as_from_the_stick(pair: Dict[str, object]) -> None:
    a, _, dest, base = nodes(pair)
    sshd, remote, key = pair["sshd"], pair["remote"], pair["key"]
    assert isinstance(sshd, Sshd) and isinstance(remote, Path) and isinstance(key, Path)
    copy_in_step(dest, a)  # the stick's copy of emergency.recover is made first, then shipped
    since = time.time()

    def shipped_since() -> bool:
        return bool((a.rpc.call("pibackup-status")["shipping"]["last_success"] or 0) >= since)

    wait_for("a shipping round after the last payment", shipped_since)
    secret = (a.net / "hsm_secret").read_bytes()
    shipped, stick = fresh_dir(base, "from-shipped", secret), fresh_dir(base, "from-stick", secret)
    out = restore(sshd.target(remote), "--lightning-dir", str(shipped), "--key", str(key), *sshd.cli_args())
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"node {a.id()} on regtest" in out.stdout and "it is this node's" in out.stderr
    assert "emergency.recover restored" in out.stdout
    assert restore(str(dest), "--lightning-dir", str(stick)).returncode == 0
    recovered = [(d / "regtest" / "emergency.recover").read_bytes() for d in (shipped, stick)]
    assert recovered == [(a.net / "emergency.recover").read_bytes()] * 2
    assert differences(stick / "regtest" / "lightningd.sqlite3", shipped / "regtest" / "lightningd.sqlite3") == []
    assert sorted(os.listdir(shipped)) == ["regtest"]  # the fetched and decrypted copies are gone


def test_new_pi_with_only_the_hsm_secret_runs_on_and_pays(pair: Dict[str, object]) -> None:
    a, b, dest, base = nodes(pair)
    secret = (a.net / "hsm_secret").read_bytes()
    a_id = a.id()
    a.kill()
    shutil.rmtree(a.dir)  # the whole lightning directory is gone with the old Pi's card
    d = fresh_dir(base, "A", secret)  # A's own path: the new Pi's lightning-dir
    assert d == a.dir
    out = restore(str(dest), "--lightning-dir", str(d))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"node {a_id} on regtest" in out.stdout and "it is this node's" in out.stderr
    assert oct(os.stat(a.db).st_mode & 0o777) == "0o600"
    assert "emergency.recover restored" in out.stdout
    assert (a.net / "emergency.recover").read_bytes() == (dest / "emergency.recover").read_bytes()
    a.start()
    assert a.id() == a_id
    wait_for("A and B to reconnect", lambda: a.channel(b)["peer_connected"] and b.channel(a)["peer_connected"])
    wait_for("A and B to agree on the balance", lambda: balances_agree(a, b))
    assert a.channel(b)["to_us_msat"] == 2_000_000_000 - 50_000_000
    assert pay(a, b, 7_000_000, "after-new-pi")["status"] == "complete"
    wait_for("A and B to agree after paying again", lambda: balances_agree(a, b))
