"""Reading one generation: its segments in order, checked against each other.

Used by the writer (to find where to go on), by restore and by verify.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

from .destination import Generation
from .errors import PibackupError
from .journal import HEADER_SIZE, JournalError, SegmentHeader, SegmentScan, decode_header, scan_segment

_ZERO_SHA = b"\0" * 32


class DamageError(PibackupError):
    """Damaged backup data; `path` and `offset` say where."""

    def __init__(self, message: str, path: str = "", offset: Optional[int] = None):
        super().__init__(message)
        self.path = path
        self.offset = offset


@dataclass
class GenerationInfo:
    number: int
    generation_id: bytes
    base_version: int
    snapshot_sha256: bytes


def check_header(gen: Generation, header: SegmentHeader, index: int, first: Optional[SegmentHeader], path: str) -> None:
    if header.generation != gen.number:
        raise DamageError(f"{path}: belongs to generation {header.generation}, found in {gen.name}", path, 0)
    if header.segment != index + 1:
        raise DamageError(f"{path}: is segment {header.segment} but stands at position {index + 1}: a segment is missing", path, 0)
    if first is not None and (
        header.generation_id != first.generation_id
        or header.base_version != first.base_version
        or header.snapshot_sha256 != first.snapshot_sha256
    ):
        raise DamageError(f"{path}: comes from another backup than the segments before it", path, 0)
    if first is None:
        has_snap = header.snapshot_sha256 != _ZERO_SHA
        if has_snap != (gen.snapshot is not None):
            raise DamageError(f"{gen.path}: snapshot file and segment header disagree (missing snapshot?)", path, 0)


def iter_segments(gen: Generation) -> Iterator[SegmentScan]:
    """Yield each segment's scan in order (one segment in memory at a time).

    Raises DamageError when a segment does not continue exactly where the one before
    it validly ended, or when a segment other than the last is damaged. The last
    segment may end in a torn tail; callers look at `scan.torn_tail` / `scan.clean`.
    """
    if not gen.segments:
        raise DamageError(f"{gen.path}: generation has no journal segment", gen.path, None)
    first: Optional[SegmentHeader] = None
    prev: Optional[SegmentScan] = None
    for i, path in enumerate(gen.segments):
        try:
            scan = scan_segment(path)
        except JournalError as e:
            raise DamageError(str(e), path, 0) from e
        except OSError as e:
            raise DamageError(f"{path}: cannot read: {e.strerror}", path, None) from e
        check_header(gen, scan.header, i, first, path)
        if prev is not None:
            h = scan.header
            if h.prev_valid_length != prev.valid_length or h.prev_checksum != prev.final_checksum:
                raise DamageError(
                    f"{prev.path}: damaged at offset {prev.valid_length} ({prev.bad_reason or 'unexpected end'}); "
                    f"the next segment says it ends at {h.prev_valid_length}",
                    prev.path,
                    prev.valid_length,
                )
            yield prev
        if first is None:
            first = scan.header
        prev = scan
    assert prev is not None
    yield prev


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
