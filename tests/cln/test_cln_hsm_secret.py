"""pibackup's node id from an hsm_secret equals the real lightningd's, for each format
Core Lightning v26 starts from: the BIP39 mnemonic it writes for a new node, and the plain
32 bytes of nodes made before it (read as they are, never converted)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest
from harness import Cluster

from pibackup.node.hsmsecret import read_hsm_secret

pytestmark = pytest.mark.xdist_group("cln-hsm-secret")


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
