"""The hsm_secret formats Core Lightning v26 reads, told apart as lightningd does, and the node
ids pinned to what the real lightningd v26.06.6 reported for them (tests/cln checks it live)."""

from __future__ import annotations

import os

from pibackup.node.hsmsecret import read_hsm_secret
from pibackup.node.networks import canonical, network_of

# A regtest node's hsm_secret as lightningd v26.06.6 wrote it, and the id its getinfo gave.
MNEMONIC = b"hospital wide weird range fun march merry utility cupboard room spatial erase"
MNEMONIC_ID = "03eb62c954a2aa92c3368467d4546e8496dff62256fd28c3cf2292e6e227e1d5d5"


def test_mnemonic_without_passphrase_gives_the_node_id_lightningd_gave() -> None:
    s = read_hsm_secret(bytes(32) + MNEMONIC)
    assert s.kind == "mnemonic" and s.node_id is not None and s.node_id.hex() == MNEMONIC_ID


def test_formats_that_cannot_be_checked_say_so() -> None:
    assert read_hsm_secret(os.urandom(73)).kind == "encrypted"
    assert read_hsm_secret(b"\x01" * 32 + MNEMONIC).kind == "mnemonic with passphrase"
    for bad in (b"", b"x" * 31, bytes(32) + b"\xff\xfe" * 20, bytes(32) + b"two words"):
        assert read_hsm_secret(bad).kind == "invalid"
    assert all(read_hsm_secret(b).node_id is None for b in (os.urandom(73), b"\x01" * 32 + MNEMONIC))


def test_plain_secret_gives_a_compressed_public_key() -> None:
    s = read_hsm_secret(bytes(range(32)))
    assert s.kind == "plain" and s.node_id is not None and len(s.node_id) == 33 and s.node_id[0] in (2, 3)


def test_networks_by_genesis_hash_in_lightningds_byte_order() -> None:
    regtest_in_vars = bytes.fromhex("06226e46111a0b59caaf126043eb5bbf28c34f3a5e332a1fc7b2b73cf188910f")
    assert network_of(regtest_in_vars) == "regtest"
    assert network_of(regtest_in_vars[::-1]) is None
    assert canonical("mainnet") == "bitcoin" and canonical("Testnet4") == "testnet4" and canonical("liquid") is None
