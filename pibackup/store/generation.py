"""What a generation says about itself: its id, base version and snapshot hash, and its settings.

Read from the first segment's header and INFO frame only, without walking the chain (store/chain.py does that).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

from pibackup.errors import DamageError, PibackupError
from pibackup.store.directory import Generation
from pibackup.store.reader import SegmentReader
from pibackup.store.segment import HEADER_SIZE, KIND_INFO, JournalError, decode_header


@dataclass
class GenerationInfo:
    number: int
    generation_id: bytes
    base_version: int
    snapshot_sha256: bytes


def generation_settings(gen: Generation) -> Dict[str, str]:
    """The key=value lines of a generation's INFO frame (the first frame of its first
    segment): the writer's release and filter-tables. Empty if it has none or cannot be read."""
    if not gen.segments:
        return {}
    try:
        with SegmentReader(gen.segments[0]) as r:
            for f in r.frames():
                if f.kind != KIND_INFO:
                    return {}
                return dict(line.partition("=")[::2] for line in f.statements)
    except (OSError, PibackupError):
        pass
    return {}


def generation_info(gen: Generation) -> GenerationInfo:
    if not gen.segments:
        raise DamageError(f"{gen.path}: generation has no journal segment", gen.path, None)
    path = gen.segments[0]
    try:
        with open(path, "rb") as f:
            h = decode_header(f.read(HEADER_SIZE), path)
    except JournalError as e:
        raise DamageError(str(e), path, 0) from e
    return GenerationInfo(h.generation, h.generation_id, h.base_version, h.snapshot_sha256)
