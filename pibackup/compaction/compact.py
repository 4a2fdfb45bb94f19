"""Compaction's old single module: its parts live in child, process, newgen, compactor,
retention and messages now. moved: removed in the sweep (once the writer's old construction path goes)."""

from __future__ import annotations

# moved: removed in the sweep
from pibackup.compaction.child import build_snapshot as build_snapshot
from pibackup.compaction.child import child_main as child_main
from pibackup.compaction.compactor import Compactor as Compactor
from pibackup.compaction.messages import Built as Built
from pibackup.compaction.newgen import NewGeneration as NewGeneration
from pibackup.compaction.retention import apply_retention as apply_retention
from pibackup.modes.journal.port import CompactionError as CompactionError
from pibackup.modes.journal.port import GenerationDamaged as GenerationDamaged
from pibackup.modes.journal.port import Superseded as Superseded
from pibackup.store.follow import JournalFollower as JournalFollower
