"""Retention: complete generations older than the newest `keep` are deleted, never the
writer's own or anything newer (FORMAT.md, "Retention")."""

from __future__ import annotations

from typing import Any, List

from pibackup.store import directory as dst
from pibackup.testpoints import crash_point


def apply_retention(dest: dst.Destination, keep: int, log: Any, protect: int, configured: int = 0) -> List[str]:
    """Delete complete generations older than the newest `keep`, never the one numbered
    `protect` (the writer's) or anything newer."""
    gens = [g for g in dest.generations() if g.number < protect]
    newer = len(dest.generations()) - len(gens)
    doomed = gens[: max(0, len(gens) - max(0, keep - newer))]
    for g in doomed:
        dest.delete_generation(g)
        crash_point("retention")
        log(f"deleted backup generation {g.name} (pibackup-keep-generations={configured or keep})", "info")
    return [g.name for g in doomed]
