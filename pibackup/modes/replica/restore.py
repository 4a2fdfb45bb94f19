"""Replica mode's restore and verify: a checked copy of the newest replica with its pending
transaction applied, and a read-only check of every replica in a backup directory.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from typing import List, Optional, Tuple

from pibackup.modes.replica.state import STATE_TABLE, ReplicaError, read_state, refused, refused_pending
from pibackup.rules import replayguard
from pibackup.rules.replayguard import Refused
from pibackup.store.access import refuse_foreign
from pibackup.store.fsio import private_file
from pibackup.store.layout import REPLICA_FILE, replica_dirs
from pibackup.store.output import building, check_database, check_replace
from pibackup.store.recover import check_node_files
from pibackup.store.replay import RestoreError
from pibackup.store.snapshot import read_data_version


@dataclass
class ReplicaOutcome:
    replica: str
    applied: int
    last_version: int
    pending_applied: bool
    filtered_tables: List[str]
    rescan_from: Optional[int] = None


def newest_replica(backup_dir: str) -> str:
    refuse_foreign(backup_dir)  # as a journal backup: nothing another user planted is restored
    dirs = replica_dirs(backup_dir)
    if not dirs:
        raise RestoreError(f"{backup_dir} holds no complete replica yet")
    return os.path.join(dirs[-1][1], REPLICA_FILE)


def restore_replica(backup_dir: str, output: str, force: bool = False) -> ReplicaOutcome:
    """A verified copy of the newest replica: copied with SQLite's backup API to
    OUTPUT.pibackup-tmp, its pending transaction applied (as a journal restore applies its
    last one), pibackup's table dropped, checked, synced, renamed."""
    src = newest_replica(backup_dir)
    output = os.path.abspath(output)
    check_replace(backup_dir, output, force)
    with building(output, f"restore from the replica {src}") as tmp:
        source = sqlite3.connect(f"file:{src}?mode=ro", uri=True, isolation_level=None)
        try:
            os.close(private_file(tmp))  # the backup API writes into it and keeps its mode
            out_conn = sqlite3.connect(tmp, isolation_level=None)
            try:
                source.backup(out_conn)
            finally:
                out_conn.close()
        finally:
            source.close()
        conn = replayguard.connect(tmp, protected={STATE_TABLE}, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = DELETE")
            conn.execute("PRAGMA foreign_keys = ON")
            state = read_state(conn)
            bad_pending = refused_pending(src, state)
            if bad_pending is not None:
                raise bad_pending
            if not state.pending_fk:  # stored inside a migration that runs with foreign keys off
                conn.execute("PRAGMA foreign_keys = OFF")
            conn.execute("BEGIN")
            for s in state.pending or []:
                try:
                    conn.replay(s)
                except Refused as e:
                    raise refused(src, state.last, e) from e
            conn.execute(f"DROP TABLE {STATE_TABLE}")
            conn.execute("COMMIT")
            conn.execute("PRAGMA foreign_keys = ON")
            got = read_data_version(conn) if state.last else 0
            if got != state.last:
                raise RestoreError(f"restored replica says data_version {got} but its state says {state.last}: run `pibackup verify`")
            check_database(conn, "the replica")
            filtered = [t for t in state.filter_tables.split(",") if t]
            rescan = None
            if "utxoset" in filtered:
                row = conn.execute("SELECT MIN(height) FROM blocks").fetchone()
                rescan = row[0] if row else None
        finally:
            conn.close()
    return ReplicaOutcome(src, state.applied, state.last, state.pending is not None, filtered, rescan)


def verify_replica(backup_dir: str) -> Tuple[List[str], bool]:
    refuse_foreign(backup_dir)
    lines, damaged = check_node_files(backup_dir)  # whose backup, its emergency.recover
    for _, path in replica_dirs(backup_dir):
        f = os.path.join(path, REPLICA_FILE)
        try:
            conn = sqlite3.connect(f"file:{f}?mode=ro", uri=True, isolation_level=None)
            try:
                state = read_state(conn)
                row = conn.execute("PRAGMA integrity_check").fetchone()
            finally:
                conn.close()
        except (sqlite3.Error, ReplicaError) as e:
            lines.append(f"{os.path.basename(path)}: DAMAGED: {e}")
            damaged = True
            continue
        pend = f", data_version {state.pending_version} pending" if state.pending_version is not None else ""
        lines.append(f"{os.path.basename(path)}: replica at data_version {state.applied}{pend}")
        bad_pending = refused_pending(f, state)
        if bad_pending is not None:
            lines.append(f"  DAMAGED: {bad_pending}")
            damaged = True
        if row is None or row[0] != "ok":
            lines.append(f"  DAMAGED: integrity check: {row[0] if row else '?'}")
            damaged = True
    return lines, damaged
