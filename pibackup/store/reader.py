"""Reading one segment file: its valid frames, one at a time, and how the file ended.

FORMAT.md's rule for where a segment's valid content ends (torn tail, preallocated zeros, damage) lives here.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator, List, Optional, Tuple

from pibackup.store.fsio import IO_CHUNK
from pibackup.store.segment import (
    ENCODING_DEFLATE,
    ENCODING_PLAIN,
    ENCODINGS,
    FLAG_DEFLATE,
    FRAME_FIELDS,
    FRAME_HEADER_SIZE,
    HEADER_SIZE,
    KINDS,
    MAX_INFLATED,
    MAX_PAYLOAD,
    SYNC_TAIL,
    U32,
    Frame,
    SegmentHeader,
    decode_header,
    decode_statements,
)

# The first four bytes any frame header can start with: where a damaged segment is searched
# for a frame that chains on (a torn tail has none after it).
_FRAME_STARTS = tuple(bytes([k, e, 0, 0]) for k in KINDS for e in ENCODINGS)


class SegmentReader:
    """Streams the valid frames of one segment file, then says how the file ended.

    Memory is one frame at a time. After `frames()` is exhausted: `valid_length` and
    `final_checksum` describe the valid content; `bad_offset` is where it stopped short
    of the end of the file (None when it did not), `torn` whether what follows is a torn
    tail (FORMAT.md: "Where a segment's valid content ends") rather than damage.
    """

    def __init__(self, path: str, data: Optional[bytes] = None):
        self.path = path
        self._f: BinaryIO = io.BytesIO(data) if data is not None else open(path, "rb")  # noqa: SIM115
        try:
            self._f.seek(0, os.SEEK_END)
            self.file_size = self._f.tell()
            self._f.seek(0)
            self.header = decode_header(self._f.read(HEADER_SIZE), path)
        except BaseException:
            self._f.close()
            raise
        self.valid_length = HEADER_SIZE
        self.final_checksum = self.header.checksum
        self.bad_offset: Optional[int] = None
        self.bad_reason = ""
        self.torn = False
        self.frame_count = 0
        self._resumed = False
        self._undecodable: Optional[Tuple[int, str]] = None  # (offset, why) of a frame that did not decode
        self._encoding = ENCODING_DEFLATE if self.header.flags & FLAG_DEFLATE else ENCODING_PLAIN
        self._inflate = zlib.decompressobj(-15) if self._encoding == ENCODING_DEFLATE else None

    @property
    def clean(self) -> bool:
        return self.bad_offset is None

    @property
    def undecodable(self) -> bool:
        """It stopped at a whole frame, its checksum right, whose payload cannot be decoded."""
        return self._undecodable is not None

    def resume_at(self, offset: int, checksum: int) -> None:
        """Read on from `offset`, a frame boundary where the writer restarted its deflate
        stream (SegmentWriter.restart_stream), `checksum` being the chain value there: the
        frames before it need not be read (a compaction follows its journal from its cut)."""
        self.valid_length, self.final_checksum = offset, checksum
        self._resumed = True
        self._undecodable = None
        self._inflate = zlib.decompressobj(-15) if self._encoding == ENCODING_DEFLATE else None

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> SegmentReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def frames(self, limit: Optional[int] = None) -> Iterator[Frame]:
        """The valid frames from where the last call stopped (the start, the first time).

        `limit` reads only the first `limit` bytes of the file: a segment another thread is
        appending to is followed up to what its writer has made durable, and a later call
        picks up from there (the compactor follows the journal this way)."""
        if limit is not None or self._resumed:
            self._f.seek(0, os.SEEK_END)
            self.file_size = self._f.tell() if limit is None else min(limit, self._f.tell())
            self.bad_offset, self.bad_reason, self.torn = None, "", False
        self._resumed = True
        pos, seed = self.valid_length, self.final_checksum
        if self._undecodable is not None:
            # The inflate stream went past that frame's bytes: it cannot be read again.
            self.bad_offset, self.bad_reason = self._undecodable
            return
        while pos < self.file_size:
            frame, reason, end = self._frame_at(pos, seed)
            if frame is not None:
                frame, reason = self._decode(frame)
                if frame is None:
                    # Complete and its checksum verifies: what an interrupted append cannot
                    # leave behind. Damage, never a torn tail (it may hold an acknowledged
                    # transaction).
                    self.bad_offset, self.bad_reason = pos, reason
                    self._undecodable = (pos, reason)
                    break
            if frame is None:
                if not self._zero_from(pos):  # zeros to the end: unused preallocated space
                    self.bad_offset, self.bad_reason = pos, reason
                    self.torn = self._torn_after(pos)
                break
            self.frame_count += 1
            seed, pos = frame.checksum, end
            self.valid_length, self.final_checksum = pos, seed
            yield frame

    def _decode(self, raw: Frame) -> Tuple[Optional[Frame], str]:
        """Turn a checksummed frame's payload into statements (inflating in stream order)."""
        payload = raw.payload
        if raw.encoding != self._encoding:
            return None, "frame encoding differs from its segment's"
        try:
            if self._inflate is not None:
                # At most MAX_INFLATED + 1 bytes come out, whatever the input: memory stays
                # bounded while inflating, not only after.
                payload = self._inflate.decompress(payload + SYNC_TAIL, MAX_INFLATED + 1)
                if self._inflate.unconsumed_tail or len(payload) > MAX_INFLATED:
                    return None, f"its payload inflates to more than {MAX_INFLATED // (1024 * 1024)} MiB"
            statements = decode_statements(payload)
        except (ValueError, UnicodeDecodeError, struct.error, zlib.error):
            return None, "undecodable payload"
        return Frame(raw.kind, raw.data_version, statements, raw.offset, raw.checksum), ""

    def _frame_at(self, pos: int, seed: int) -> Tuple[Optional[Frame], str, int]:
        """The frame at pos if it is complete and its checksum chains from seed (payload
        still encoded: `statements` is empty until _decode)."""
        f = self._f
        f.seek(pos)
        head = f.read(FRAME_HEADER_SIZE)
        if len(head) < FRAME_HEADER_SIZE:
            return None, "incomplete frame header at the end of the file", self.file_size
        kind, encoding, reserved, version, length = FRAME_FIELDS.unpack_from(head)
        (stored,) = U32.unpack_from(head, FRAME_FIELDS.size)
        if kind not in KINDS or encoding not in ENCODINGS or reserved != 0 or length > MAX_PAYLOAD:
            return None, "not a frame header", self.file_size
        start = pos + FRAME_HEADER_SIZE
        if start + length > self.file_size:
            return None, "frame runs past the end of the file", self.file_size
        payload = f.read(length)
        if zlib.crc32(payload, zlib.crc32(head[: FRAME_FIELDS.size], seed)) != stored:
            return None, "checksum mismatch", start + length
        return Frame(kind, version, [], pos, stored, encoding, payload), "", start + length

    def _torn_after(self, pos: int) -> bool:
        """Is what starts at pos the remains of an interrupted append, rather than damage?

        Yes when fewer bytes than a frame header remain, or when a plausible frame runs
        past the end of the file or into zeros that last to the end (preallocated space),
        and no frame anywhere after it chains from its checksum. Anything else is damage: a
        reader must never take acknowledged frames after a damaged one for an unfinished
        append.
        """
        remaining = self.file_size - pos
        if remaining < FRAME_HEADER_SIZE:
            return True
        if self._zero_from(pos):
            return True
        f = self._f
        f.seek(pos)
        head = f.read(FRAME_HEADER_SIZE)
        kind, encoding, reserved, _, length = FRAME_FIELDS.unpack_from(head)
        plausible = kind in KINDS and encoding in ENCODINGS and reserved == 0 and length <= MAX_PAYLOAD
        end = pos + FRAME_HEADER_SIZE + length
        if not plausible or (end < self.file_size and not self._zero_from(end)):
            return False
        (stored,) = U32.unpack_from(head, FRAME_FIELDS.size)
        return not self._resyncs(pos + FRAME_HEADER_SIZE, stored)

    def _zero_from(self, pos: int) -> bool:
        self._f.seek(pos)
        while True:
            b = self._f.read(IO_CHUNK)
            if not b:
                return True
            if b.count(0) != len(b):
                return False

    def _resyncs(self, start: int, seed: int) -> bool:
        """Does a frame chaining from `seed` start anywhere at or after `start`?"""
        self._f.seek(start)
        rest = self._f.read()  # only on damage, and bounded by the segment size
        for marker in _FRAME_STARTS:
            i = rest.find(marker)
            while i >= 0:
                frame, _, _ = self._frame_at(start + i, seed)
                if frame is not None:
                    return True
                i = rest.find(marker, i + 1)
        return False


@dataclass
class SegmentScan:
    """A whole segment read into memory (tests and small tools; readers stream instead)."""

    path: str
    header: SegmentHeader
    frames: List[Frame] = field(default_factory=list)
    valid_length: int = HEADER_SIZE
    final_checksum: int = 0
    file_size: int = 0
    bad_offset: Optional[int] = None
    bad_reason: str = ""
    torn: bool = False

    @property
    def clean(self) -> bool:
        return self.bad_offset is None

    @property
    def torn_tail(self) -> bool:
        return self.bad_offset is not None and self.torn


def scan_segment(path: str, data: Optional[bytes] = None) -> SegmentScan:
    with SegmentReader(path, data) as r:
        frames = list(r.frames())
        return SegmentScan(path, r.header, frames, r.valid_length, r.final_checksum, r.file_size, r.bad_offset, r.bad_reason, r.torn)
