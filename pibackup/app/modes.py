"""The mode registry: for each pibackup-mode, how to tell its backup directory, build its
writer, restore, verify and describe it offline. The hook and the CLI never branch on the mode.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from pibackup.app import recoverfile
from pibackup.app.config import Config
from pibackup.compaction.wiring import make_journal_writer
from pibackup.modes.api import Log, Writer
from pibackup.modes.journal import restore as journal_restore
from pibackup.modes.replica.restore import restore_replica, verify_replica
from pibackup.modes.replica.writer import ReplicaWriter
from pibackup.store.directory import writer_running
from pibackup.store.layout import holds_replica
from pibackup.store.replay import Outcome

Progress = Callable[[Outcome, float, float], None]


@dataclass(frozen=True)
class RestoreArgs:
    force: bool = False
    generation: Optional[int] = None  # journal mode: restore this generation, not the newest
    partial: bool = False  # journal mode: stop at damage in the middle instead of failing
    progress: Optional[Progress] = None  # journal mode: called about twice a second while replaying


@dataclass
class Restored:
    """What a restore did, for the CLI to print: `lines` on stdout, `notes` and `warnings` on stderr."""

    lines: List[str]
    notes: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    filtered_tables: List[str] = field(default_factory=list)
    rescan_from: Optional[int] = None
    damaged: bool = False
    checks_copy: bool = True  # weigh a fetched copy against its head record (journal mode's copies have one)


@dataclass
class Verified:
    lines: List[str]
    damaged: bool
    checks_copy: bool = True


@dataclass
class Report:
    """`pibackup status`: `data` for --json (None: this mode prints its text either way)."""

    lines: List[str]
    data: Optional[Dict[str, Any]]
    failed: bool = False


@dataclass(frozen=True)
class Mode:
    name: str
    detect: Callable[[str], bool]
    make_writer: Callable[[str, str, Log, Config], Writer]
    restore: Callable[[str, str, RestoreArgs], Restored]
    verify: Callable[[str], Verified]
    offline_status: Callable[[str], Report]


# --- journal mode -----------------------------------------------------------------------
def _journal_writer(path: str, live_db: str, log: Log, c: Config) -> Writer:
    return make_journal_writer(
        path,
        live_db,
        log,
        segment_bytes=c.segment_bytes,
        filter_tables=c.filter_tables,
        batch_seconds=c.batch_seconds,
        batch_bytes=c.batch_bytes,
        preallocate=c.preallocate_bytes,
        compact_ratio=c.compact_ratio,
        compact_min_bytes=c.compact_min_bytes,
        keep_generations=c.keep_generations,
    )


def _journal_restore(src: str, output: str, a: RestoreArgs) -> Restored:
    out = journal_restore.restore(src, output, force=a.force, generation=a.generation, partial=a.partial, progress=a.progress)
    r = Restored(
        [
            f"restored {output} at data_version {out.last_version} from {out.generation} "
            f"(base {out.base_version}, {out.transactions} transactions replayed, {out.rewinds} rewound ones skipped)"
        ],
        filtered_tables=list(out.filtered_tables),
        rescan_from=out.rescan_from,
        damaged=bool(out.damage),
    )
    if out.torn_tail:
        r.notes += [out.torn_tail, f"everything up to data_version {out.last_version} is restored"]
    if out.damage:
        r.warnings += [out.damage, f"restored only up to data_version {out.last_version} (--partial)"]
    return r


def _journal_verify(src: str) -> Verified:
    rep = journal_restore.verify(src)
    return Verified(list(rep.lines), rep.damaged)


def _journal_status(src: str) -> Report:
    st = journal_restore.offline_status(src)
    node_lines, _, node = recoverfile.describe(src)
    st.update(node)
    lines = [f"backup directory {st['path']}: {st['state']}"] + node_lines
    for g in st["generations"]:
        base = f"snapshot at data_version {g['base_version']}" if g["snapshot"] else "empty database"
        lines.append(f"  {g['name']}: {base}, {g['segments']} segment(s), {g['bytes'] // 1024} KiB")
    if st.get("last_data_version") is not None:
        lines.append(f"newest data_version: {st['last_data_version']}")
    if st.get("last_write") is not None:
        lines.append(f"last write: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(st['last_write']))}")
    lines.append(f"free space: {st['free_bytes'] // (1024 * 1024)} MiB")
    lines.append("a running pibackup is writing it" if st["writer_running"] else "no pibackup is writing it now")
    return Report(lines, st)


# --- replica mode -----------------------------------------------------------------------
def _replica_writer(path: str, live_db: str, log: Log, c: Config) -> Writer:
    return ReplicaWriter(path, live_db, log, filter_tables=c.filter_tables)


def _replica_restore(src: str, output: str, a: RestoreArgs) -> Restored:
    r = restore_replica(src, output, force=a.force)
    how = ", its last transaction applied" if r.pending_applied else ""
    return Restored(
        [f"restored {output} at data_version {r.last_version} from the replica {r.replica}{how}"],
        filtered_tables=list(r.filtered_tables),
        rescan_from=r.rescan_from,
        checks_copy=False,
    )


def _replica_verify(src: str) -> Verified:
    lines, damaged = verify_replica(src)
    return Verified(lines, damaged, checks_copy=False)


def _replica_status(src: str) -> Report:
    lines, damaged = verify_replica(src)  # its node id, network and emergency.recover first
    out = [f"backup directory {os.path.abspath(src)} (replica mode): {'DAMAGED' if damaged else 'ok'}"]
    out += ["  " + line for line in lines]
    out.append("a running pibackup is writing it" if writer_running(src) else "no pibackup is writing it now")
    return Report(out, None, failed=damaged)


MODES: Dict[str, Mode] = {
    m.name: m
    for m in (
        # Journal mode is what a directory is when it is nothing else (a new, empty one too).
        Mode("journal", lambda path: not holds_replica(path), _journal_writer, _journal_restore, _journal_verify, _journal_status),
        Mode("replica", holds_replica, _replica_writer, _replica_restore, _replica_verify, _replica_status),
    )
}


def detect(path: str) -> Mode:
    """The mode whose backup `path` holds: replica if it has a replica-NNNNNN directory, else journal."""
    return MODES["replica"] if MODES["replica"].detect(path) else MODES["journal"]
