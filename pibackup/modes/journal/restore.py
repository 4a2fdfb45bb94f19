"""Restore (snapshot + journal -> database file, via tmp, fsync, rename) and verify.

Replays one SQL transaction per data_version with foreign keys on, as lightningd's own
connection runs (replay.py), through the replay guard; the database is private to its owner.
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Generator, List, Optional, Tuple

from pibackup.errors import DamageError
from pibackup.rules import replayguard
from pibackup.store import directory as dst
from pibackup.store import snapfile
from pibackup.store.access import check_marker
from pibackup.store.chain import End, iter_frames, read_tail
from pibackup.store.fsio import private_file
from pibackup.store.generation import generation_info
from pibackup.store.layout import MARKER, PARTIAL_SUFFIX
from pibackup.store.output import building, check_database, check_replace, copy_snapshot
from pibackup.store.recover import check_node_files
from pibackup.store.replay import REPLAY_BATCH, Outcome, Replayer, RestoreError
from pibackup.store.segment import Frame
from pibackup.store.snapshot import SnapshotError, read_data_version


def _frames(gen: dst.Generation, out: Outcome, partial: bool) -> Generator[Tuple[Frame, str], None, None]:
    """Every valid frame of a generation; damage raises unless `partial`, a torn tail is noted."""
    end = End()
    try:
        yield from iter_frames(gen, end)
    except DamageError as e:
        if not partial:
            raise
        out.damage = str(e)
    finally:
        out.segments = end.segments
        out.torn_tail = end.torn_tail
        out.leftovers = end.leftovers


def pick_generation(backup_dir: str, number: Optional[int] = None) -> dst.Generation:
    if not os.path.isdir(backup_dir):
        raise RestoreError(f"{backup_dir} is not a directory (is the USB stick mounted?)")
    if not os.path.exists(os.path.join(backup_dir, MARKER)):
        raise RestoreError(f"{backup_dir} is not a pibackup backup (no {MARKER} file in it)")
    check_marker(backup_dir)
    gens = dst.Destination(backup_dir).generations()
    if not gens:
        raise RestoreError(f"{backup_dir} holds no complete backup generation yet")
    if number is None:
        return gens[-1]
    for g in gens:
        if g.number == number:
            return g
    raise RestoreError(f"{backup_dir} has no generation {number}; it has {', '.join(str(g.number) for g in gens)}")


def restore(
    backup_dir: str,
    output: str,
    force: bool = False,
    generation: Optional[int] = None,
    partial: bool = False,
    progress: Optional[Callable[[Outcome, float, float], None]] = None,
    progress_interval: float = 0.5,
) -> Outcome:
    """Rebuild OUTPUT from the backup. `progress(outcome, fraction done, transactions per
    second)` is called about twice a second while replaying."""
    gen = pick_generation(backup_dir, generation)
    info = generation_info(gen)
    output = os.path.abspath(output)
    check_replace(backup_dir, output, force)
    out = Outcome(gen.name, info.base_version, info.base_version)
    with building(output, f"build {output}") as tmp:
        if gen.snapshot is not None:
            copy_snapshot(gen.snapshot, tmp, info.snapshot_sha256)
        else:
            os.close(private_file(tmp))
        conn = replayguard.connect(tmp, isolation_level=None)
        try:
            conn.execute("PRAGMA foreign_keys = ON")  # as lightningd's own connection
            conn.execute("PRAGMA journal_mode = MEMORY")  # tmp is thrown away on failure anyway
            conn.execute("PRAGMA synchronous = OFF")  # one fsync at the end instead
            # --partial: one SQL transaction per data_version, so that a statement the guard
            # refuses is undone alone and the restore ends just before it.
            replayer = Replayer(conn, info.base_version, out, batch=1 if partial else REPLAY_BATCH)
            sizes = {p: os.path.getsize(p) for p in gen.segments}
            before, total = {}, 0
            for p in gen.segments:
                before[p], total = total, total + sizes[p]
            started = last_report = time.monotonic()
            frames = _frames(gen, out, partial)
            try:
                for frame, where in frames:
                    replayer.feed(frame, where)
                    now = time.monotonic()
                    if progress is not None and now - last_report >= progress_interval:
                        last_report = now
                        done = before.get(where.rsplit(" offset ", 1)[0], 0) + frame.offset
                        progress(out, done / max(1, total), out.transactions / max(1e-9, now - started))
            except DamageError as e:  # a refused statement (damage in the file itself: _frames)
                if not partial:
                    raise
                out.damage = str(e)
            finally:
                frames.close()  # out's segment counts are final
            replayer.finish()
            out.last_version = replayer.current
            _check_result(conn, out)
            # No `blocks` table: a generation that holds no transaction yet (a fresh node's
            # first one, cut by a crash before its first frames were synced).
            if "utxoset" in out.filtered_tables and conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'blocks'").fetchone():
                row = conn.execute("SELECT MIN(height) FROM blocks").fetchone()
                out.rescan_from = row[0] if row else None
            conn.execute("PRAGMA journal_mode = DELETE")
        finally:
            conn.close()
    return out


def _check_result(conn: sqlite3.Connection, out: Outcome) -> None:
    if out.transactions or out.base_version:
        try:
            got = read_data_version(conn)
        except SnapshotError as e:
            raise RestoreError(f"restored database is not a Core Lightning database: {e}") from e
        if got != out.last_version:
            raise RestoreError(
                f"restored database says data_version {got} but the journal ends at {out.last_version}: "
                "the backup does not replay cleanly; run `pibackup verify`"
            )
    check_database(conn, "restored database")


@dataclass
class VerifyReport:
    lines: List[str] = field(default_factory=list)
    damaged: bool = False


def verify(backup_dir: str) -> VerifyReport:
    """Read every generation and every frame; report ranges and damage."""
    rep = VerifyReport()
    pick_generation(backup_dir)  # the same checks restore makes; raises when unusable
    rep.lines, rep.damaged = check_node_files(backup_dir)  # whose backup, its emergency.recover
    d = dst.Destination(backup_dir)
    for name in sorted(os.listdir(backup_dir)):
        if name.endswith(PARTIAL_SUFFIX):
            rep.lines.append(f"{name}: unfinished generation (never used; removed at the plugin's next start)")
    gens = d.generations()
    for gen in gens:
        try:
            info = generation_info(gen)
        except DamageError as e:
            rep.damaged = True
            rep.lines.append(f"{gen.name}: DAMAGED: {e}")
            continue
        out = Outcome(gen.name, info.base_version, info.base_version)
        problems: List[str] = []
        if gen.snapshot is not None:
            try:
                _check_snapshot(gen.snapshot, info.snapshot_sha256)
            except DamageError as e:
                problems.append(str(e))
        try:
            rp = Replayer(None, info.base_version, out)
            for frame, where in _frames(gen, out, partial=False):
                rp.feed(frame, where)
            rp.finish()
            out.last_version = rp.current
        except DamageError as e:
            problems.append(str(e))
        base = f"snapshot at data_version {info.base_version}" if gen.snapshot else "empty database"
        head = (
            f"{gen.name}: {base}, journal to data_version {out.last_version}: {out.transactions} transactions, "
            f"{out.pragmas} PRAGMA calls, {out.rewinds} rewound, {out.segments} segment(s)"
        )
        rep.lines.append(head + (" - newest" if gen is gens[-1] else ""))
        for note in out.leftovers + ([out.torn_tail] if out.torn_tail else []):
            rep.lines.append(f"  note: {note}")
        for p in problems:
            rep.damaged = True
            rep.lines.append(f"  DAMAGED: {p}")
        mark = dst.damage_mark(gen.path)
        if mark is not None:
            rep.lines.append(f"  note: the plugin found it damaged while it ran (a newer generation replaces it): {mark}")
    return rep


def _check_snapshot(path: str, expected: bytes) -> None:
    """Read it whole as a restore would: every chunk of a compressed one inflated and
    checked, and the file's SHA-256 against the journal's header."""
    snapfile.check(path, expected)


def offline_status(backup_dir: str) -> Dict[str, Any]:
    """A backup directory's state as `pibackup status` shows it, without lightningd."""
    pick_generation(backup_dir)  # the same checks as restore
    gens = dst.Destination(backup_dir).generations()
    out: Dict[str, Any] = {"path": os.path.abspath(backup_dir), "generations": []}
    for g in gens:
        files = g.snapshots + g.segments
        try:
            base: Optional[int] = generation_info(g).base_version
        except DamageError:
            base = None
        out["generations"].append(
            {
                "name": g.name,
                "base_version": base,
                "snapshot": g.snapshot is not None,
                "segments": len(g.segments),
                "bytes": sum(os.path.getsize(f) for f in files),
            }
        )
    newest = gens[-1]
    try:
        t = read_tail(newest)
        out["last_data_version"] = t.last_frame.data_version if t.last_frame else generation_info(newest).base_version
        out["state"] = "ok" if t.bad_offset is None or t.torn else f"DAMAGED at {t.path} offset {t.bad_offset}"
    except DamageError as e:
        out["last_data_version"] = None
        out["state"] = f"DAMAGED: {e}"
    out["last_write"] = int(max(os.path.getmtime(f) for f in newest.segments)) if newest.segments else None
    st = os.statvfs(backup_dir)
    out["free_bytes"] = st.f_bavail * st.f_frsize
    out["writer_running"] = dst.writer_running(backup_dir)
    return out
