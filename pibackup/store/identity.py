"""Whose backup a directory holds: lightningd's node id and network (its `vars` rows
`node_id` and `genesis_hash`), recorded in DEST/NODE and read from the backup's own data.

A node must never write into another node's backup: the writer's start compares the live
database's identity with the backup's before it writes anything (FORMAT.md, "NODE").
"""

from __future__ import annotations

import os
import re
import sqlite3
import urllib.parse
from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

from pibackup.errors import DamageError, PibackupError
from pibackup.store import snapfile
from pibackup.store.access import DestinationError
from pibackup.store.fsio import write_text_durably
from pibackup.store.layout import (
    NODE_FILE,
    REPLICA_FILE,
    SEGMENT_RE,
    SNAPSHOT_RE,
    generation_number,
    replica_dirs,
)
from pibackup.store.reader import SegmentReader

NODE_HEADER = "pibackup node"
NODE_ID_BYTES = 33  # a compressed secp256k1 public key
GENESIS_BYTES = 32
# lightningd keeps genesis_hash in internal byte order: the reverse of how explorers print it.
NETWORKS = {
    "6fe28c0ab6f1b372c1a6a246ae63f74f931e8365e15a089c68d6190000000000": "bitcoin",
    "43497fd7f826957108f4a30fd9cec3aeba79972084e90ead01ea330900000000": "testnet",
    "43f08bdab050e35b567c864b91f47f50ae725ae2de53bcfbbaf284da00000000": "testnet4",
    "f61eee3b63a380a477a063af32b2bbc97c9ff9f01f2c4225e973988108000000": "signet",
    "06226e46111a0b59caaf126043eb5bbf28c34f3a5e332a1fc7b2b73cf188910f": "regtest",
}
_VARS_INSERT = re.compile(r"'(node_id|genesis_hash)'\s*,\s*[xX]'([0-9a-fA-F]+)'")
_SCAN_FRAMES = 5000  # lightningd writes both rows in its first transactions


class IdentityError(PibackupError):
    pass


@dataclass(frozen=True)
class Identity:
    """A node's identity as far as it is known: either part may be None (a brand-new node
    before lightningd wrote it, a backup that does not say)."""

    node_id: Optional[bytes] = None
    genesis_hash: Optional[bytes] = None

    @property
    def known(self) -> bool:
        return self.node_id is not None and self.genesis_hash is not None

    @property
    def network(self) -> Optional[str]:
        """bitcoin, testnet, testnet4, signet, regtest, or "genesis HEX" for another chain."""
        if self.genesis_hash is None:
            return None
        return NETWORKS.get(self.genesis_hash.hex(), f"genesis {self.genesis_hash.hex()}")

    def describe(self) -> str:
        node = self.node_id.hex() if self.node_id is not None else "unknown node id"
        return f"node {node} on {self.network or 'an unknown network'}"

    def conflict(self, other: Identity) -> Optional[str]:
        """What differs between two identities, comparing only what both know; None if nothing."""
        out = []
        if self.node_id is not None and other.node_id is not None and self.node_id != other.node_id:
            out.append("node id")
        if self.genesis_hash is not None and other.genesis_hash is not None and self.genesis_hash != other.genesis_hash:
            out.append("network")
        return " and ".join(out) or None

    def as_json(self) -> dict:
        return {
            "node_id": self.node_id.hex() if self.node_id is not None else None,
            "network": self.network,
        }


UNKNOWN = Identity()


def _blob(value: object, size: int) -> Optional[bytes]:
    if isinstance(value, bytes) and len(value) == size:
        return value
    if isinstance(value, str) and re.fullmatch(f"[0-9a-fA-F]{{{2 * size}}}", value):
        return bytes.fromhex(value)  # an old database kept it as hex text in `val`
    return None


def identity_of_db(path: str, at_rest: bool, timeout: float = 2.0) -> Identity:
    """The `vars` rows of an sqlite3 database: lightningd's live one (`at_rest` False: one
    short read transaction, as for data_version) or a file of the backup (`at_rest`: immutable).
    Unknown when the rows are not there yet; IdentityError when the file cannot be read. A
    compressed snapshot carries the two rows in its header (store/snapfile.py)."""
    if at_rest and snapfile.is_compressed(path):
        try:
            h = snapfile.read_header(path)
        except (OSError, DamageError) as e:
            raise IdentityError(f"cannot read the node id from {path}: {e}") from e
        node, genesis = (v if any(v) else None for v in (h.node_id, h.genesis_hash))  # zeros: not there yet
        return Identity(_blob(node, NODE_ID_BYTES), _blob(genesis, GENESIS_BYTES))
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + ("?mode=ro&immutable=1" if at_rest else "?mode=ro")
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None)
        try:
            rows = conn.execute("SELECT name, blobval, val FROM vars WHERE name IN ('node_id', 'genesis_hash')").fetchall()
        finally:
            conn.close()
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return UNKNOWN  # a database lightningd has not created its schema in yet
        raise IdentityError(f"cannot read the node id from {path}: {e}") from e
    except sqlite3.Error as e:
        raise IdentityError(f"cannot read the node id from {path}: {e}") from e
    found = {name: (blob if blob is not None else val) for name, blob, val in rows}
    return Identity(_blob(found.get("node_id"), NODE_ID_BYTES), _blob(found.get("genesis_hash"), GENESIS_BYTES))


def identity_of_statements(statements: Iterable[str]) -> Identity:
    """lightningd's INSERT of the two rows, as a journal holds them (a generation that starts
    from an empty database has no snapshot to read them from)."""
    node = genesis = None
    for s in statements:
        if "node_id" not in s and "genesis_hash" not in s:
            continue
        for name, hexval in _VARS_INSERT.findall(s):
            if name == "node_id" and len(hexval) == 2 * NODE_ID_BYTES:
                node = bytes.fromhex(hexval)
            elif name == "genesis_hash" and len(hexval) == 2 * GENESIS_BYTES:
                genesis = bytes.fromhex(hexval)
    return Identity(node, genesis)


def identity_of_generation(gen_path: str) -> Identity:
    """What a journal generation holds: its snapshot's rows, or its first segment's INSERTs."""
    names = sorted(os.listdir(gen_path))
    snaps = [n for n in names if SNAPSHOT_RE.match(n)]
    if snaps:
        return identity_of_db(os.path.join(gen_path, snaps[0]), at_rest=True)
    segs = [n for n in names if SEGMENT_RE.match(n)]
    if not segs:
        return UNKNOWN
    node = genesis = None
    try:
        with SegmentReader(os.path.join(gen_path, segs[0])) as r:
            for n, frame in enumerate(r.frames()):
                found = identity_of_statements(frame.statements)
                node, genesis = found.node_id or node, found.genesis_hash or genesis
                if (node and genesis) or n > _SCAN_FRAMES:
                    break
    except (OSError, PibackupError):
        pass  # damage is verify's and restore's to report; the identity is then what was read
    return Identity(node, genesis)


def _newest_generation(path: str) -> Optional[str]:
    numbered = [(generation_number(n), n) for n in os.listdir(path)]
    found = sorted((num, n) for num, n in numbered if num is not None)
    return os.path.join(path, found[-1][1]) if found else None


def identity_of_data(path: str) -> Identity:
    """What the backup's newest generation (journal mode) or replica (replica mode) says."""
    replicas = replica_dirs(path)
    if replicas:
        return identity_of_db(os.path.join(replicas[-1][1], REPLICA_FILE), at_rest=True)
    gen = _newest_generation(path)
    return identity_of_generation(gen) if gen is not None else UNKNOWN


# --- DEST/NODE ----------------------------------------------------------------------------
def node_file_text(identity: Identity) -> str:
    assert identity.node_id is not None and identity.genesis_hash is not None
    return f"{NODE_HEADER}\nnode_id {identity.node_id.hex()}\ngenesis_hash {identity.genesis_hash.hex()}\nnetwork {identity.network}\n"


def read_node_file(path: str) -> Optional[Identity]:
    """DEST/NODE, or None when there is none (a backup written before it existed, or a new
    node's before its id was known). IdentityError when it is not what pibackup writes."""
    node_path = os.path.join(path, NODE_FILE)
    try:
        with open(node_path, encoding="utf-8", errors="replace") as f:
            text = f.read(4096)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise IdentityError(f"cannot read {node_path}: {e.strerror}") from e
    fields = dict(line.partition(" ")[::2] for line in text.splitlines()[1:])
    node = _blob(fields.get("node_id", ""), NODE_ID_BYTES)
    genesis = _blob(fields.get("genesis_hash", ""), GENESIS_BYTES)
    identity = Identity(node, genesis)
    if not text.startswith(NODE_HEADER + "\n") or node is None or genesis is None or text != node_file_text(identity):
        raise IdentityError(
            f"{node_path} is damaged (it is not the four lines pibackup writes): the medium may be failing; run "
            f"pibackup verify {path}. If the backup is this node's, delete {node_path}: the next start writes it again"
        )
    return identity


def write_node_file(path: str, identity: Identity) -> None:
    """Record whose backup `path` is (PATH.tmp synced, renamed, the directory synced)."""
    write_text_durably(os.path.join(path, NODE_FILE), node_file_text(identity))


def backup_identity(path: str) -> Tuple[Identity, str]:
    """Whose backup `path` holds and where that was read: NODE, or, without one, the
    newest generation's (or replica's) own data."""
    recorded = read_node_file(path)
    if recorded is not None:
        return recorded, NODE_FILE
    try:
        return identity_of_data(path), "its newest data"
    except IdentityError:
        # A damaged newest snapshot or replica says nothing: the writer's own start deals
        # with the damage (a new generation from the live database), as before NODE existed.
        return UNKNOWN, "its newest data (unreadable)"


def refuse_other_node(path: str, live_db: str) -> Identity:
    """Before anything is written to `path` (no marker, lock, generation or deletion): raise
    DestinationError when it holds another node's backup, or one of another network, by its
    NODE or by its newest data (a generation of another node put beside this node's NODE
    must not be continued either). Returns the live database's identity."""
    live = identity_of_db(live_db, at_rest=False)
    try:
        recorded = read_node_file(path)
    except IdentityError as e:
        raise DestinationError(str(e)) from e
    try:
        data = identity_of_data(path)
    except IdentityError:
        data = UNKNOWN  # a damaged newest snapshot or replica: the writer's start handles the damage
    sources = ((recorded, NODE_FILE), (data, "its newest data"))
    conflicts = [(held, source) for held, source in sources if held is not None and held.conflict(live)]
    if not conflicts:
        return live
    held, source = conflicts[0]
    what = held.conflict(live)
    raise DestinationError(
        f"{path} holds the backup of another node or network ({what} differ): it is the backup of {held.describe()} "
        f"(from {source}), and this lightningd's database {live_db} is {live.describe()}. Nothing in {path} was "
        "written or deleted. Give this node a pibackup-destination of its own (an empty directory); if this backup "
        "should be this node's, its database or hsm_secret is not the one the backup was made from"
    )


def identity_lines(path: str) -> Tuple[List[str], bool]:
    """For status and verify: the node id and network the backup holds, and whether NODE
    disagrees with the backup's own data (damage: written by two nodes, or altered)."""
    try:
        recorded = read_node_file(path)
    except IdentityError as e:
        return [f"DAMAGED: {e}"], True
    try:
        data = identity_of_data(path)
    except IdentityError:
        data = UNKNOWN  # a damaged newest snapshot or replica: the generations' own checks report it
    shown = recorded or data
    lines = [
        f"node id: {shown.node_id.hex() if shown.node_id else 'not known yet'}",
        f"network: {shown.network or 'not known yet'}",
    ]
    if recorded is not None:
        what = recorded.conflict(data)
        if what is not None:
            lines.append(f"DAMAGED: {NODE_FILE} names {recorded.describe()}, but the newest data is {data.describe()} ({what} differ)")
            return lines, True
    elif data.known:
        lines.append(f"{NODE_FILE}: none (a backup written before pibackup recorded it): read from the newest data")
    return lines, False
