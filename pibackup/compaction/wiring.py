"""Builds a journal writer with its compactor: the one place that knows both, so the writer
(modes/journal) never imports compaction and compaction sees the writer only as its port."""

from __future__ import annotations

from typing import FrozenSet, Optional

from pibackup.compaction.compactor import Compactor
from pibackup.modes.api import Log
from pibackup.modes.journal.writer import JournalWriter


def make_journal_writer(
    destination: str,
    live_db: str,
    log: Log,
    *,
    segment_bytes: int,
    filter_tables: FrozenSet[str],
    batch_seconds: float,
    batch_bytes: int,
    preallocate: int,
    compress: bool = True,
    compact_ratio: float = 0.0,
    compact_min_bytes: int = 0,
    keep_generations: int = 0,
) -> JournalWriter:
    """A journal writer for `destination`; with keep_generations > 0 it compacts (when its
    journal passes compact_ratio times its snapshot and compact_min_bytes, or when asked)
    and keeps that many generations."""
    compactor: Optional[Compactor] = None
    if keep_generations > 0:
        compactor = Compactor(compact_ratio, compact_min_bytes, keep_generations, log)
    writer = JournalWriter(
        destination,
        live_db,
        log,
        segment_bytes=segment_bytes,
        filter_tables=filter_tables,
        batch_seconds=batch_seconds,
        batch_bytes=batch_bytes,
        preallocate=preallocate,
        compress=compress,
        compaction=compactor,
    )
    if compactor is not None:
        compactor.bind(writer)
    return writer
