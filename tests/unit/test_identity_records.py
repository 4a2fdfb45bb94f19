"""store/identity.py: the node id and network as lightningd's vars rows hold them, DEST/NODE
read back exactly as written, and the conflicts that refuse a backup."""

from __future__ import annotations

import sqlite3

import pytest

from pibackup.store.identity import (
    Identity,
    IdentityError,
    identity_of_db,
    identity_of_statements,
    node_file_text,
    read_node_file,
    write_node_file,
)

NODE_A = bytes.fromhex("036c3e4dc827c5507c0a1545c89222893186454994d7e364e4077278cd559635ed")
NODE_B = bytes.fromhex("033648beeb7431c82dc862793e7aaa1ccbca8c1c4ad7648d839b77f4d4aae9deaf")
REGTEST = bytes.fromhex("06226e46111a0b59caaf126043eb5bbf28c34f3a5e332a1fc7b2b73cf188910f")
MAINNET = bytes.fromhex("000000000019d6689c085ae165831e934ff763ae46a2a6c172b3f1b60a8ce26f")[::-1]


def test_networks_by_genesis_hash_in_lightningds_byte_order():
    assert Identity(NODE_A, REGTEST).network == "regtest"
    assert Identity(NODE_A, MAINNET).network == "bitcoin"
    assert Identity(NODE_A, b"\1" * 32).network == "genesis " + "01" * 32
    assert Identity().network is None and not Identity(NODE_A).known


def test_conflicts_compare_only_what_both_know():
    a = Identity(NODE_A, REGTEST)
    assert a.conflict(Identity(NODE_B, REGTEST)) == "node id"
    assert a.conflict(Identity(NODE_A, MAINNET)) == "network"
    assert a.conflict(Identity(NODE_B, MAINNET)) == "node id and network"
    assert a.conflict(Identity()) is None and a.conflict(Identity(None, REGTEST)) is None


def test_the_rows_from_a_database_and_from_lightningds_statements(tmp_path):
    db = tmp_path / "l.sqlite3"
    with pytest.raises(IdentityError, match="cannot read the node id"):
        identity_of_db(str(db), at_rest=False)
    c = sqlite3.connect(db)
    c.execute("CREATE TABLE version (version INTEGER)")
    c.commit()
    assert identity_of_db(str(db), at_rest=False) == Identity()  # lightningd's schema not there yet
    c.execute("CREATE TABLE vars (name TEXT, val TEXT, intval INTEGER, blobval BLOB)")
    c.execute("INSERT INTO vars (name, blobval) VALUES ('node_id', ?)", (NODE_A,))
    c.execute("INSERT INTO vars (name, val) VALUES ('genesis_hash', ?)", (REGTEST.hex(),))  # hex text, as before blobval
    c.commit()
    c.close()
    assert identity_of_db(str(db), at_rest=True) == Identity(NODE_A, REGTEST)
    (tmp_path / "junk").write_bytes(b"not a database at all" * 100)
    with pytest.raises(IdentityError):
        identity_of_db(str(tmp_path / "junk"), at_rest=True)
    stmts = [
        f"INSERT INTO vars (name, blobval) VALUES ('genesis_hash', x'{REGTEST.hex()}');",
        f"INSERT INTO vars (name, blobval) VALUES ('node_id', x'{NODE_A.hex()}');",
    ]
    assert identity_of_statements(stmts) == Identity(NODE_A, REGTEST)
    assert identity_of_statements(["UPDATE vars SET blobval = CAST(val AS BLOB) WHERE name = 'genesis_hash'"]) == Identity()


def test_node_file_round_trip_and_every_damage_refused(tmp_path):
    assert read_node_file(str(tmp_path)) is None
    write_node_file(str(tmp_path), Identity(NODE_A, REGTEST))
    path = tmp_path / "NODE"
    assert path.stat().st_mode & 0o777 == 0o600 and not (tmp_path / "NODE.tmp").exists()
    assert read_node_file(str(tmp_path)) == Identity(NODE_A, REGTEST)
    good = node_file_text(Identity(NODE_A, REGTEST))
    for bad in (good[:-1], good + "x\n", good.replace("regtest\n", "bitcoin\n"), good.replace(NODE_A.hex(), NODE_A.hex()[:-2]), ""):
        path.write_text(bad)
        with pytest.raises(IdentityError, match="is damaged"):
            read_node_file(str(tmp_path))
