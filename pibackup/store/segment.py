"""The journal's format: segment headers, frames, their encodings and size caps.

Byte layout is specified in FORMAT.md; reader.py applies its rule for where a segment ends, writer.py appends.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from pibackup.errors import PibackupError

SEGMENT_MAGIC = b"PIBKJRNL"
FORMAT_VERSION = 1

# magic, format version, header size, generation number, generation id,
# segment number, base data_version, flags, snapshot sha256,
# previous segment's valid length, previous segment's final checksum, created (unix s), reserved
_HEADER = struct.Struct(">8sHHI16sIII32sQIQ28x")  # 28 reserved zero bytes
HEADER_SIZE = _HEADER.size + 4  # + crc32 of everything before it
assert HEADER_SIZE == 128

# kind, encoding, reserved, data_version, payload length
FRAME_FIELDS = struct.Struct(">BBHII")
FRAME_HEADER_SIZE = FRAME_FIELDS.size + 4  # + chained crc32
assert FRAME_HEADER_SIZE == 16

KIND_TX = 1  # one committed transaction: BEGIN; statements; COMMIT
KIND_PRAGMA = 2  # statements lightningd ran outside a transaction (PRAGMA foreign_keys)
KIND_INFO = 3  # "key=value" lines about the generation (e.g. its filter); never replayed
KINDS = (KIND_TX, KIND_PRAGMA, KIND_INFO)
ENCODING_PLAIN = 0
ENCODING_DEFLATE = 1  # the payload continues the segment's raw deflate stream (FORMAT.md)
ENCODINGS = (ENCODING_PLAIN, ENCODING_DEFLATE)
FLAG_DEFLATE = 1  # segment header flag: every frame in the segment uses ENCODING_DEFLATE
DEFLATE_LEVEL = 6  # measured on the recordings: level 9 saves <1% for twice the CPU
SYNC_TAIL = b"\x00\x00\xff\xff"  # what Z_SYNC_FLUSH ends with; stripped on disk

# A frame larger than this is treated as damage, not as a frame: lightningd's
# biggest transaction (the schema) is ~100 KB; a corrupt length must not make a
# reader allocate gigabytes.
MAX_PAYLOAD = 256 * 1024 * 1024
# What one deflate frame may inflate to. Deflate expands up to ~1000x, so without a cap a
# small damaged or planted segment makes a reader allocate hundreds of MiB. lightningd's
# biggest transaction in the recordings (its schema) is ~21 KB; a frame past this is damage.
MAX_INFLATED = 16 * 1024 * 1024

U32 = struct.Struct(">I")


class JournalError(PibackupError):
    """A journal file that cannot be used at all (wrong magic, newer format, bad header)."""


@dataclass(frozen=True)
class SegmentHeader:
    generation: int
    generation_id: bytes
    segment: int
    base_version: int
    snapshot_sha256: bytes
    prev_valid_length: int = 0
    prev_checksum: int = 0
    created: int = 0
    flags: int = 0

    def encode(self) -> bytes:
        body = _HEADER.pack(
            SEGMENT_MAGIC,
            FORMAT_VERSION,
            HEADER_SIZE,
            self.generation,
            self.generation_id,
            self.segment,
            self.base_version,
            self.flags,
            self.snapshot_sha256,
            self.prev_valid_length,
            self.prev_checksum,
            self.created,
        )
        return body + U32.pack(zlib.crc32(body))

    @property
    def checksum(self) -> int:
        """The chain seed: the header's own crc32."""
        return zlib.crc32(self.encode()[: _HEADER.size])


def decode_header(data: bytes, path: str) -> SegmentHeader:
    """Parse a segment header; the format version is checked before anything else."""
    if len(data) < 12 or data[:8] != SEGMENT_MAGIC:
        raise JournalError(f"{path}: not a pibackup journal segment (bad magic)")
    version, size = struct.unpack(">HH", data[8:12])
    if version != FORMAT_VERSION:
        raise JournalError(
            f"{path}: journal format version {version}; this pibackup reads version "
            f"{FORMAT_VERSION} only. Use the pibackup release that wrote it."
        )
    if size != HEADER_SIZE or len(data) < HEADER_SIZE:
        raise JournalError(f"{path}: truncated or malformed segment header")
    body = data[: _HEADER.size]
    (stored,) = U32.unpack(data[_HEADER.size : HEADER_SIZE])
    if zlib.crc32(body) != stored:
        raise JournalError(f"{path}: segment header checksum mismatch (damaged header)")
    f = _HEADER.unpack(body)
    if f[7] & ~FLAG_DEFLATE:
        raise JournalError(f"{path}: unknown segment flags {f[7]:#x}: written by a newer pibackup")
    return SegmentHeader(
        generation=f[3],
        generation_id=f[4],
        segment=f[5],
        base_version=f[6],
        flags=f[7],
        snapshot_sha256=f[8],
        prev_valid_length=f[9],
        prev_checksum=f[10],
        created=f[11],
    )


def encode_statements(statements: Sequence[str]) -> bytes:
    parts = [U32.pack(len(statements))]
    for s in statements:
        b = s.encode("utf-8")
        parts.append(U32.pack(len(b)))
        parts.append(b)
    return b"".join(parts)


def decode_statements(payload: bytes) -> List[str]:
    (count,) = U32.unpack_from(payload, 0)
    pos = 4
    out = []
    for _ in range(count):
        (n,) = U32.unpack_from(payload, pos)
        pos += 4
        if pos + n > len(payload):
            raise ValueError("statement runs past the end of its frame")
        out.append(payload[pos : pos + n].decode("utf-8"))
        pos += n
    if pos != len(payload):
        raise ValueError("bytes left over after the last statement")
    return out


def encode_frame(
    kind: int,
    data_version: int,
    statements: Sequence[str],
    prev_checksum: int,
    deflate: Optional[zlib._Compress] = None,
) -> tuple[bytes, int]:
    """Return (frame bytes, its checksum), chained from prev_checksum. With `deflate`, the
    payload continues that compressor's raw deflate stream up to a sync-flush point."""
    payload = encode_statements(statements)
    # Readers refuse a payload past MAX_INFLATED, so the writer refuses it first: halting
    # lightningd is better than acknowledging a transaction no restore would accept.
    if len(payload) > MAX_INFLATED:
        raise JournalError(
            f"lightningd sent a transaction of {len(payload) // (1024 * 1024)} MiB; a backup holds at most "
            f"{MAX_INFLATED // (1024 * 1024)} MiB per transaction. Find what writes so much at once "
            "(a plugin's datastore entry?) and make it smaller"
        )
    encoding = ENCODING_PLAIN
    if deflate is not None:
        packed = deflate.compress(payload) + deflate.flush(zlib.Z_SYNC_FLUSH)
        assert packed.endswith(SYNC_TAIL)
        payload, encoding = packed[: -len(SYNC_TAIL)], ENCODING_DEFLATE
    head = FRAME_FIELDS.pack(kind, encoding, 0, data_version & 0xFFFFFFFF, len(payload))
    crc = zlib.crc32(payload, zlib.crc32(head, prev_checksum))
    return head + U32.pack(crc) + payload, crc


@dataclass(frozen=True)
class Frame:
    kind: int
    data_version: int
    statements: List[str]
    offset: int  # of the frame header in its segment file
    checksum: int
    encoding: int = ENCODING_PLAIN
    payload: bytes = field(default=b"", repr=False)  # as stored; dropped once decoded
