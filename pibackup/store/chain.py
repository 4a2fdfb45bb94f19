"""Reading one generation's chain: its segments in order, checked against each other.

The one reader of a chain: every frame (iter_frames, whole or up to a cut), the tail a writer
goes on from (read_tail), and a segment's checksum chain without inflating (walk_segment, for
copies); one frame in memory at a time.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Tuple

from pibackup.errors import DamageError
from pibackup.store.directory import Generation
from pibackup.store.layout import plain_snapshot_filename, snapshot_filename
from pibackup.store.reader import SegmentReader
from pibackup.store.segment import (
    ENCODINGS,
    FRAME_FIELDS,
    FRAME_HEADER_SIZE,
    HEADER_SIZE,
    KIND_INFO,
    KINDS,
    MAX_PAYLOAD,
    U32,
    Frame,
    JournalError,
    SegmentHeader,
    decode_header,
)

_ZERO_SHA = b"\0" * 32


def _open(path: str) -> SegmentReader:
    try:
        return SegmentReader(path)
    except JournalError as e:
        raise DamageError(str(e), path, 0) from e
    except OSError as e:
        raise DamageError(f"{path}: cannot read: {e.strerror}", path, None) from e


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
        names = (snapshot_filename(header.base_version), plain_snapshot_filename(header.base_version))
        if gen.snapshot is not None and os.path.basename(gen.snapshot) not in names:
            raise DamageError(f"{gen.snapshot}: name does not match the base data_version {header.base_version}", path, 0)
    if len(gen.snapshots) > 1:
        raise DamageError(f"{gen.path}: more than one snapshot file", gen.path, None)


@dataclass
class End:
    """How a generation's journal ended, filled in while iter_frames runs."""

    segments: int = 0
    torn_tail: Optional[str] = None
    leftovers: List[str] = field(default_factory=list)  # bytes after a closed segment's valid content


def iter_frames(gen: Generation, end: End, limit: Optional[int] = None) -> Iterator[Tuple[Frame, str]]:
    """Every valid frame of a generation, in order, with "file offset N" for messages.

    Raises DamageError at the first damage, after yielding every frame before it. A torn
    tail in the last segment is not damage: it is noted in `end.torn_tail`. `limit` reads
    only the first `limit` bytes of the last segment (compaction's cut: what the writer had
    made durable in the segment it goes on appending to).
    """
    if not gen.segments:
        raise DamageError(f"{gen.path}: generation has no journal segment", gen.path, None)
    first: Optional[SegmentHeader] = None
    prev: Optional[SegmentReader] = None
    for i, path in enumerate(gen.segments):
        reader = _open(path)
        with reader:
            check_header(gen, reader.header, i, first, path)
            if prev is not None:
                h = reader.header
                if h.prev_valid_length != prev.valid_length or h.prev_checksum != prev.final_checksum:
                    what = f"damaged at offset {prev.valid_length} ({prev.bad_reason or 'unexpected end'})"
                    raise DamageError(
                        f"{prev.path}: {what}; the next segment says it ends at {h.prev_valid_length}",
                        prev.path,
                        prev.valid_length,
                    )
            first = first or reader.header
            end.segments += 1
            last = i == len(gen.segments) - 1
            for f in reader.frames(limit if last else None):
                yield f, f"{path} offset {f.offset}"
            if reader.bad_offset is not None and not last:
                # The next segment's header (checked next) confirms where this one's valid
                # content ends; what follows is a write cut short before the writer moved on.
                end.leftovers.append(
                    f"{path}: {reader.file_size - reader.bad_offset} bytes after its valid content at offset "
                    f"{reader.bad_offset} ({reader.bad_reason}): a write cut short, then continued in the next "
                    "segment; nothing is missing, but on a healthy medium this is rare"
                )
            if reader.bad_offset is not None and last:
                if reader.undecodable:
                    raise DamageError(
                        f"{path}: damaged at offset {reader.bad_offset} ({reader.bad_reason}): a whole frame whose "
                        "checksum is right but whose content cannot be read, which no crash leaves behind: the file "
                        "was altered. `restore --partial` restores everything before it",
                        path,
                        reader.bad_offset,
                    )
                if not reader.torn:
                    raise DamageError(
                        f"{path}: damaged at offset {reader.bad_offset} ({reader.bad_reason}), with data after it. "
                        "If this follows a power cut, it may be a write cut short whose pages reached the stick "
                        "out of order: `restore --partial` restores everything before it",
                        path,
                        reader.bad_offset,
                    )
                end.torn_tail = (
                    f"{path}: unfinished append at offset {reader.bad_offset} ({reader.bad_reason}): a write cut "
                    "short by a crash or power cut; no critical transaction in it had been acknowledged"
                )
            prev = reader


@dataclass
class Tail:
    """What the writer needs from the newest generation to go on appending."""

    last_frame: Optional[Frame]  # the newest TX or PRAGMA frame, None when there is none
    header: SegmentHeader  # of the last segment
    path: str  # of the last segment
    valid_length: int
    final_checksum: int
    file_size: int
    bad_offset: Optional[int]
    bad_reason: str
    torn: bool


def read_tail(gen: Generation) -> Tail:
    """The last segment (and the ones before it back to the newest frame). Cross-checking
    the whole journal is verify's job; start-up only reads what it needs."""
    if not gen.segments:
        raise DamageError(f"{gen.path}: generation has no journal segment", gen.path, None)
    with open(gen.segments[0], "rb") as fh:
        try:
            first = decode_header(fh.read(HEADER_SIZE), gen.segments[0])
        except JournalError as e:
            raise DamageError(str(e), gen.segments[0], 0) from e
    tail: Optional[Tail] = None
    for i in range(len(gen.segments) - 1, -1, -1):
        path = gen.segments[i]
        with _open(path) as r:
            check_header(gen, r.header, i, first, path)
            newest: Optional[Frame] = None
            for f in r.frames():
                if f.kind != KIND_INFO:
                    newest = f
            if tail is None:
                tail = Tail(None, r.header, path, r.valid_length, r.final_checksum, r.file_size, r.bad_offset, r.bad_reason, r.torn)
        if newest is not None:
            tail.last_frame = newest
            break
    assert tail is not None
    return tail


# --- the newest frame of a segment, for copies ------------------------------------------
@dataclass
class Walk:
    """How far the frames of one segment were checked: offset after the last valid frame,
    its chained checksum, and its data_version."""

    path: str
    offset: int = HEADER_SIZE
    checksum: int = 0
    data_version: Optional[int] = None


def walk_segment(w: Walk, limit: int) -> Walk:
    """Follow the checksum chain from where `w` stopped up to `limit` bytes of the file:
    the valid content as any reader finds it (header fields and checksums only, nothing
    inflated). Segments only grow at their end, so a walk goes on where it stopped."""
    with open(w.path, "rb", buffering=1 << 16) as f:
        if w.offset == HEADER_SIZE and w.data_version is None:
            head = f.read(HEADER_SIZE)
            if len(head) < HEADER_SIZE:
                return w
            w.checksum = struct.unpack(">I", head[124:128])[0]  # the header's crc32: the chain's seed
        f.seek(w.offset)
        while w.offset + FRAME_HEADER_SIZE <= limit:
            fh = f.read(FRAME_HEADER_SIZE)
            if len(fh) < FRAME_HEADER_SIZE:
                break
            kind, encoding, reserved, version, length = FRAME_FIELDS.unpack(fh[: FRAME_FIELDS.size])
            if kind not in KINDS or encoding not in ENCODINGS or reserved or length > MAX_PAYLOAD:
                break
            if w.offset + FRAME_HEADER_SIZE + length > limit:
                break
            payload = f.read(length)
            crc = zlib.crc32(payload, zlib.crc32(fh[: FRAME_FIELDS.size], w.checksum))
            if len(payload) < length or crc != U32.unpack(fh[FRAME_FIELDS.size : FRAME_HEADER_SIZE])[0]:
                break
            w.offset += FRAME_HEADER_SIZE + length
            w.checksum = crc
            w.data_version = version
    return w
