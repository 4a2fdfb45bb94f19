"""pibackup's node id from an hsm_secret equals the real lightningd's (and its hsmtool's), for
each format Core Lightning v26 starts from: the BIP39 mnemonic it writes for a new node, and
the plain 32 bytes of nodes made before it; the two it cannot check without a passphrase
(a mnemonic with one, an encrypted legacy file) are recognised as such."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
from harness import BIN, Cluster, require_cln

from pibackup.node.hsmsecret import read_hsm_secret


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("cln-hsm"))
    try:
        yield c
    finally:
        c.close()


def test_a_new_nodes_mnemonic_hsm_secret_gives_lightningds_node_id(cluster: Cluster) -> None:
    n = cluster.node("mnemonic")
    data = (n.net / "hsm_secret").read_bytes()
    secret = read_hsm_secret(data)
    assert secret.kind == "mnemonic" and data[:32] == bytes(32)
    assert secret.node_id is not None and secret.node_id.hex() == n.id()


def test_a_plain_32_byte_hsm_secret_gives_lightningds_node_id(cluster: Cluster) -> None:
    n = cluster.node("plain", start=False)
    n.net.mkdir(parents=True)
    path = n.net / "hsm_secret"
    path.write_bytes(os.urandom(32))
    os.chmod(path, 0o400)
    n.start()
    assert path.stat().st_size == 32  # lightningd used it as it was
    secret = read_hsm_secret(Path(path).read_bytes())
    assert secret.kind == "plain"
    assert secret.node_id is not None and secret.node_id.hex() == n.id()


def hsmtool(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "lightning-hsmtool"), *args], input=stdin, capture_output=True, text=True, timeout=120)


def test_files_made_by_lightning_hsmtool_are_told_apart_as_lightningd_does(tmp_path: Path) -> None:
    require_cln()
    words = "hospital wide weird range fun march merry utility cupboard room spatial erase"
    plain = tmp_path / "plain"
    plain.write_bytes(os.urandom(32))
    assert hsmtool("getnodeid", str(plain)).stdout.strip() == (read_hsm_secret(plain.read_bytes()).node_id or b"").hex()
    nopass = tmp_path / "nopass"
    assert hsmtool("generatehsm", str(nopass), stdin=f"{words}\n\n").returncode == 0
    s = read_hsm_secret(nopass.read_bytes())
    assert s.kind == "mnemonic" and s.node_id is not None
    assert hsmtool("getnodeid", str(nopass)).stdout.strip() == s.node_id.hex()
    withpass = tmp_path / "withpass"
    assert hsmtool("generatehsm", str(withpass), stdin=f"{words}\na passphrase\n").returncode == 0
    assert read_hsm_secret(withpass.read_bytes()).kind == "mnemonic with passphrase"
    encrypted = tmp_path / "encrypted"
    encrypted.write_bytes(os.urandom(32))
    assert hsmtool("encrypt", str(encrypted), stdin="a password\na password\n").returncode == 0
    assert encrypted.stat().st_size == 73 and read_hsm_secret(encrypted.read_bytes()).kind == "encrypted"
