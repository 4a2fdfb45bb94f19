"""Starting journal segments: a generation's first and each next one (roll-over, continue
after a restart), their headers and how far ahead their zeros are written, in one place.

The journal writer and compaction's new generation both start segments here, so the header
fields a reader checks (FORMAT.md: flags, created, prev_valid_length/prev_checksum) and the
preallocation rule cannot drift apart between them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Optional

from pibackup.store.layout import segment_filename
from pibackup.store.segment import FLAG_DEFLATE, SegmentHeader
from pibackup.store.writer import SegmentWriter

PREALLOCATE_SHARE = 16
PREALLOCATE_FLOOR = 16 * 1024  # a few dozen payments' frames between two extensions


@dataclass(frozen=True)
class SegmentSettings:
    """How a destination's segments are written (pibackup-compress, pibackup-preallocate-kb)."""

    flags: int  # FLAG_DEFLATE or 0
    preallocate: int  # bytes of zeros written ahead at most

    @staticmethod
    def of(compress: bool, preallocate: int) -> SegmentSettings:
        return SegmentSettings(FLAG_DEFLATE if compress else 0, preallocate)

    def chunk_for(self, snapshot_bytes: int) -> int:
        """Preallocation chunk for a segment of a generation of this size (its snapshot, and
        its journal so far as the writer goes on): pibackup-preallocate-kb, but no more than
        1/PREALLOCATE_SHARE of that (and no less than PREALLOCATE_FLOOR), so the zeros written
        ahead stay a small part of the backup while the database is small (the medium stays
        under 3x the database). The journal counts too: a new node's generation has no
        snapshot, and with the floor alone a busy journal paid an extension, a metadata
        commit on ext4, every 16 KiB."""
        share = snapshot_bytes // PREALLOCATE_SHARE // 4096 * 4096
        return min(self.preallocate, max(PREALLOCATE_FLOOR, share))


def first_header(
    number: int,
    base_version: int,
    snapshot_sha256: bytes,
    flags: int,
    generation_id: Optional[bytes] = None,
    created: Optional[int] = None,
) -> SegmentHeader:
    """Segment 1 of generation `number`: a fresh random generation id, no segment before it."""
    return SegmentHeader(
        generation=number,
        generation_id=os.urandom(16) if generation_id is None else generation_id,
        segment=1,
        base_version=base_version,
        snapshot_sha256=snapshot_sha256,
        created=int(time.time()) if created is None else created,
        flags=flags,
    )


def next_header(
    like: SegmentHeader, number: int, prev_length: int, prev_checksum: int, flags: int, created: Optional[int] = None
) -> SegmentHeader:
    """Segment `number` of `like`'s generation, continuing a segment whose valid content ends
    at `prev_length` with chain value `prev_checksum` (what a reader checks the join by)."""
    return SegmentHeader(
        generation=like.generation,
        generation_id=like.generation_id,
        segment=number,
        base_version=like.base_version,
        snapshot_sha256=like.snapshot_sha256,
        prev_valid_length=prev_length,
        prev_checksum=prev_checksum,
        created=int(time.time()) if created is None else created,
        flags=flags,
    )


def create_segment(directory: str, header: SegmentHeader, preallocate: int) -> SegmentWriter:
    """The segment file for `header` in the generation directory `directory`, created durably."""
    return SegmentWriter.create(os.path.join(directory, segment_filename(header.segment)), header, preallocate)


def roll_over(directory: str, w: SegmentWriter, flags: int, preallocate: int) -> SegmentWriter:
    """The segment after `w` (whose frames are flushed); the caller closes `w`."""
    return create_segment(directory, next_header(w.header, w.header.segment + 1, w.size, w.checksum, flags), preallocate)
