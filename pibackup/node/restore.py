"""`pibackup restore BACKUP --lightning-dir DIR`: a node, not a file. The database is rebuilt
beside DIR, checked against the network asked for and the hsm_secret in the network
directory, and only then moved in with emergency.recover; a refusal leaves DIR as it was.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import sqlite3
import tempfile
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from pibackup.errors import PibackupError
from pibackup.node.hsmsecret import read_hsm_secret
from pibackup.node.networks import GENESIS, canonical, network_of
from pibackup.store.fsio import fsync_dir, fsync_file
from pibackup.store.layout import EMERGENCY_RECOVER
from pibackup.store.recover import MAX_SIZE, emergency_recover_path, shape_problem

DATABASE = "lightningd.sqlite3"
HSM_SECRET = "hsm_secret"
_STAGING = re.compile(r"^\.pibackup-restore-(\d+)-")


class NodeRestoreError(PibackupError):
    """A restore into a lightning-dir refused; the message says what to do."""


@dataclass
class NodeTarget:
    """A restore into DIR/<network>/: the database is built in `staged_db` (a private
    directory inside DIR, so the final move is a rename), then `place` checks and moves it."""

    lightning_dir: str
    network: Optional[str]  # as asked for (canonical), else told by the database
    force: bool
    staging: str = ""
    notes: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)

    @property
    def staged_db(self) -> str:
        return os.path.join(self.staging, DATABASE)

    def netdir(self, network: str) -> str:
        return os.path.join(self.lightning_dir, network)

    def __enter__(self) -> NodeTarget:
        _remove_stale_staging(self.lightning_dir)
        self.staging = tempfile.mkdtemp(prefix=f".pibackup-restore-{os.getpid()}-", dir=self.lightning_dir)  # mode 700
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def place(self, backup_root: str) -> List[str]:
        """Check the staged database against the network and the hsm_secret, then move it
        and the backup's emergency.recover into the network directory. Lines to print."""
        network, node_id = self._check_network()
        netdir = self.netdir(network)
        _refuse_existing(netdir, self.force)
        self._check_node(netdir, node_id)
        recover, missing = self._recover_file(backup_root)
        owner = _owner_of(self.lightning_dir)
        if not os.path.isdir(netdir):
            os.mkdir(netdir, 0o700)
            if os.geteuid() == 0 and owner != (0, 0):
                os.chown(netdir, *owner)  # lightningd, running as that user, writes in it
        if recover is not None:
            _install(recover, os.path.join(netdir, EMERGENCY_RECOVER), 0o400, owner, copy=True)
        _install(self.staged_db, os.path.join(netdir, DATABASE), 0o600, owner, copy=False)
        lines = [f"node {node_id.hex()} on {network}: {os.path.join(netdir, DATABASE)} restored"]
        if recover is not None:
            lines.append(f"{os.path.join(netdir, EMERGENCY_RECOVER)} restored (the static channel backup)")
        else:
            self.warnings.append(
                f"{missing}: lightningd writes a new one from the restored channels at its next start, but keep any "
                "older copy you have"
            )
        return lines

    def _recover_file(self, backup_root: str) -> Tuple[Optional[str], str]:
        """The backup's copy of emergency.recover, or None and why not (none, or not lightningd's)."""
        path = emergency_recover_path(backup_root)
        if path is None:
            return None, f"this backup holds no {EMERGENCY_RECOVER}"
        with open(path, "rb") as f:
            problem = shape_problem(f.read(MAX_SIZE + 1))
        if problem is not None:
            return None, f"the backup's {EMERGENCY_RECOVER} is damaged ({problem}), so it was not restored"
        return path, ""

    def _check_network(self) -> Tuple[str, bytes]:
        conn = sqlite3.connect(f"file:{self.staged_db}?mode=ro", uri=True)
        try:
            rows = dict(conn.execute("SELECT name, blobval FROM vars WHERE name IN ('genesis_hash', 'node_id')").fetchall())
        finally:
            conn.close()
        node_id = rows.get("node_id")
        if not isinstance(node_id, bytes) or len(node_id) != 33:
            raise NodeRestoreError(
                "the restored database has no node id (vars.node_id): it is not a Core Lightning node's "
                "database, or one that never started; nothing was written"
            )
        genesis = rows.get("genesis_hash")
        found = network_of(genesis) if isinstance(genesis, bytes) else None
        if found is None:
            if self.network is None:
                raise NodeRestoreError(
                    "the restored database does not say which network it is for (no known genesis_hash in vars): "
                    "give --network NAME (" + ", ".join(GENESIS) + "); nothing was written"
                )
            self.warnings.append(f"the database does not name a known network; restoring to {self.network} as asked")
            return self.network, node_id
        if self.network is not None and found != self.network:
            raise NodeRestoreError(
                f"this backup is of a node on {found}, not {self.network} (its genesis_hash is {found}'s): "
                f"restore it with --network {found} (into {self.netdir(found)}), or pick the backup of your "
                f"{self.network} node; nothing was written"
            )
        return found, node_id

    def _check_node(self, netdir: str, node_id: bytes) -> None:
        path = os.path.join(netdir, HSM_SECRET)
        if not os.path.lexists(path):
            self.warnings.append(
                f"{netdir} has no {HSM_SECRET}. Before you start lightningd, put THIS node's {HSM_SECRET} there "
                f"(node id {node_id.hex()}): the one from your old node, or one rebuilt from its seed words with "
                f"`lightning-hsmtool`. With another {HSM_SECRET} (or none: lightningd would make a new one) "
                "lightningd refuses to start on this database, because the node id it gives is not the database's; "
                "it cannot sign for these channels"
            )
            return
        with open(path, "rb") as f:
            secret = read_hsm_secret(f.read(4096))
        if secret.node_id is None:
            what = {
                "encrypted": "is encrypted with a passphrase",
                "mnemonic with passphrase": "is a mnemonic with a passphrase",
            }.get(secret.kind, "is not in a format Core Lightning writes")
            self.warnings.append(
                f"{path} {what}: pibackup cannot check that it is this node's (node id {node_id.hex()}). "
                "lightningd checks it at start and refuses to run with another node's"
            )
            return
        if secret.node_id != node_id:
            raise NodeRestoreError(
                f"{path} is another node's: it gives node id {secret.node_id.hex()}, but this backup is of node "
                f"{node_id.hex()}. lightningd would refuse to start on it. Put the node's own {HSM_SECRET} there "
                "(or rebuild it from its seed words with `lightning-hsmtool`), or restore this node's backup; "
                "nothing was written"
            )
        self.notes.append(f"{path} gives node id {node_id.hex()}, the backup's: it is this node's")


def prepare(lightning_dir: str, network: Optional[str], force: bool) -> NodeTarget:
    """Checks that need no backup, before anything is fetched: DIR, the network's name, a
    running lightningd, a database already there."""
    if not os.path.isdir(lightning_dir):
        raise NodeRestoreError(
            f"{lightning_dir} is not a directory: create the lightning-dir (e.g. mkdir -m 700 ~/.lightning) or give "
            "the one lightningd uses"
        )
    name = None
    if network is not None:
        name = canonical(network)
        if name is None:
            raise NodeRestoreError(f"--network {network!r} is not one lightningd knows; give one of {', '.join(GENESIS)}")
    target = NodeTarget(os.path.abspath(lightning_dir), name, force)
    nets = [name] if name else [n for n in GENESIS if os.path.isdir(target.netdir(n))]
    for n in nets:
        _refuse_running(target.netdir(n))
    if name:
        _refuse_existing(target.netdir(name), force)
    return target


def _refuse_running(netdir: str) -> None:
    rpc = os.path.join(netdir, "lightning-rpc")
    if not os.path.exists(rpc):
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(rpc)
        except OSError:
            return  # a socket left by a lightningd that is gone
    raise NodeRestoreError(f"lightningd is running on {netdir}: stop it first (lightning-cli stop); nothing was written")


def _refuse_existing(netdir: str, force: bool) -> None:
    present = [n for n in (DATABASE, EMERGENCY_RECOVER) if os.path.lexists(os.path.join(netdir, n))]
    if present and not force:
        raise NodeRestoreError(
            f"{netdir} already holds {' and '.join(present)}; pibackup never replaces them unless told to. Move them "
            "away (keep them until the restored node runs) or pass --force; nothing was written"
        )


def _remove_stale_staging(lightning_dir: str) -> None:
    """Staging directories of a restore that was killed (SIGKILL, power cut): their process is gone."""
    for name in os.listdir(lightning_dir):
        m = _STAGING.match(name)
        path = os.path.join(lightning_dir, name)
        if not m or os.path.islink(path) or not os.path.isdir(path):
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue


def _owner_of(path: str) -> Tuple[int, int]:
    st = os.stat(path)
    return st.st_uid, st.st_gid


def _install(src: str, dst: str, mode: int, owner: Tuple[int, int], copy: bool) -> None:
    """`src` into place at `dst` as a whole: a synced temporary beside it, renamed. Owned by
    the lightning-dir's owner when run as root (lightningd runs as that user)."""
    tmp = dst + ".pibackup-tmp"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    if copy:
        shutil.copyfile(src, tmp)
    else:
        try:
            os.rename(src, tmp)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            shutil.copyfile(src, tmp)
    try:
        os.chmod(tmp, mode)
        if os.geteuid() == 0 and owner != (0, 0):
            os.chown(tmp, *owner)
        fsync_file(tmp)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(dst))
