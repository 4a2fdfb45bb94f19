"""The on-disk journal: segment headers, frames, and the rule for where a journal ends.

Byte layout is specified in FORMAT.md; this module is its only implementation.
"""

from __future__ import annotations

import errno
import os
import struct
import zlib
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence

from .errors import PibackupError

SEGMENT_MAGIC = b"PIBKJRNL"
FORMAT_VERSION = 1

# magic, format version, header size, generation number, generation id,
# segment number, base data_version, flags, snapshot sha256,
# previous segment's valid length, previous segment's final checksum, created (unix s), reserved
_HEADER = struct.Struct(">8sHHI16sIII32sQIQ28x")  # 28 reserved zero bytes
HEADER_SIZE = _HEADER.size + 4  # + crc32 of everything before it
assert HEADER_SIZE == 128

# kind, encoding, reserved, data_version, payload length
_FRAME = struct.Struct(">BBHII")
FRAME_HEADER_SIZE = _FRAME.size + 4  # + chained crc32
assert FRAME_HEADER_SIZE == 16

KIND_TX = 1  # one committed transaction: BEGIN; statements; COMMIT
KIND_PRAGMA = 2  # statements lightningd ran outside a transaction (PRAGMA foreign_keys)
KIND_INFO = 3  # "key=value" lines about the generation (e.g. its filter); never replayed
KINDS = (KIND_TX, KIND_PRAGMA, KIND_INFO)
ENCODING_PLAIN = 0

# A frame larger than this is treated as damage, not as a frame: lightningd's
# biggest transaction (the schema) is ~100 KB; a corrupt length must not make a
# reader allocate gigabytes.
MAX_PAYLOAD = 256 * 1024 * 1024

_U32 = struct.Struct(">I")


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
        return body + _U32.pack(zlib.crc32(body))

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
    (stored,) = _U32.unpack(data[_HEADER.size : HEADER_SIZE])
    if zlib.crc32(body) != stored:
        raise JournalError(f"{path}: segment header checksum mismatch (damaged header)")
    f = _HEADER.unpack(body)
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
    parts = [_U32.pack(len(statements))]
    for s in statements:
        b = s.encode("utf-8")
        parts.append(_U32.pack(len(b)))
        parts.append(b)
    return b"".join(parts)


def decode_statements(payload: bytes) -> List[str]:
    (count,) = _U32.unpack_from(payload, 0)
    pos = 4
    out = []
    for _ in range(count):
        (n,) = _U32.unpack_from(payload, pos)
        pos += 4
        if pos + n > len(payload):
            raise ValueError("statement runs past the end of its frame")
        out.append(payload[pos : pos + n].decode("utf-8"))
        pos += n
    if pos != len(payload):
        raise ValueError("bytes left over after the last statement")
    return out


def encode_frame(kind: int, data_version: int, statements: Sequence[str], prev_checksum: int) -> tuple[bytes, int]:
    """Return (frame bytes, its checksum), chained from prev_checksum."""
    payload = encode_statements(statements)
    head = _FRAME.pack(kind, ENCODING_PLAIN, 0, data_version & 0xFFFFFFFF, len(payload))
    crc = zlib.crc32(payload, zlib.crc32(head, prev_checksum))
    return head + _U32.pack(crc) + payload, crc


@dataclass(frozen=True)
class Frame:
    kind: int
    data_version: int
    statements: List[str]
    offset: int  # of the frame header in its segment file
    checksum: int


@dataclass
class SegmentScan:
    """What a reader found in one segment file."""

    path: str
    header: SegmentHeader
    frames: List[Frame] = field(default_factory=list)
    valid_length: int = HEADER_SIZE  # bytes from the start of the file that are valid
    final_checksum: int = 0
    file_size: int = 0
    bad_offset: Optional[int] = None  # first offset that is not a valid frame
    bad_reason: str = ""
    valid_after_bad: bool = False  # a valid frame follows the bad one: damage, not a torn tail

    @property
    def clean(self) -> bool:
        return self.bad_offset is None

    @property
    def torn_tail(self) -> bool:
        """Damage confined to the end of the file, as a power cut during an append leaves."""
        return self.bad_offset is not None and not self.valid_after_bad


def _parse_frame(data: bytes, pos: int, seed: int) -> tuple[Optional[Frame], str, int]:
    """Try to parse one frame at pos. Returns (frame or None, reason, frame end)."""
    end_of_file = len(data)
    if pos + FRAME_HEADER_SIZE > end_of_file:
        return None, "incomplete frame header at end of file", end_of_file
    head = data[pos : pos + _FRAME.size]
    kind, encoding, reserved, version, length = _FRAME.unpack(head)
    (stored,) = _U32.unpack_from(data, pos + _FRAME.size)
    if head == b"\0" * _FRAME.size and stored == 0:
        return None, "zero bytes where a frame should start", end_of_file
    if kind not in KINDS or encoding != ENCODING_PLAIN or reserved != 0 or length > MAX_PAYLOAD:
        return None, "invalid frame header", end_of_file
    start = pos + FRAME_HEADER_SIZE
    if start + length > end_of_file:
        return None, "frame extends past the end of the file", end_of_file
    payload = data[start : start + length]
    crc = zlib.crc32(payload, zlib.crc32(head, seed))
    if crc != stored:
        return None, "checksum mismatch", start + length
    try:
        statements = decode_statements(payload)
    except (ValueError, UnicodeDecodeError, struct.error):
        return None, "undecodable payload", start + length
    return Frame(kind, version, statements, pos, crc), "", start + length


def scan_segment(path: str, data: Optional[bytes] = None) -> SegmentScan:
    """Read every valid frame of a segment, and classify whatever follows them.

    The valid part of a segment is its header followed by the longest run of frames
    that are complete and whose checksums chain from the header's.
    """
    if data is None:
        with open(path, "rb") as f:
            data = f.read()
    header = decode_header(data[:HEADER_SIZE], path)
    scan = SegmentScan(path=path, header=header, file_size=len(data))
    seed = header.checksum
    pos = HEADER_SIZE
    while pos < len(data):
        frame, reason, frame_end = _parse_frame(data, pos, seed)
        if frame is None:
            scan.bad_offset = pos
            scan.bad_reason = reason
            # A frame with a readable length and a bad checksum may be followed by
            # good frames (they chain from its stored checksum): that is corruption in
            # the middle, never a torn append.
            if frame_end < len(data):
                (stored,) = _U32.unpack_from(data, pos + _FRAME.size)
                nxt, _, _ = _parse_frame(data, frame_end, stored)
                scan.valid_after_bad = nxt is not None
            break
        scan.frames.append(frame)
        seed = frame.checksum
        pos = frame_end
    scan.valid_length = pos if scan.bad_offset is None else scan.bad_offset
    scan.final_checksum = seed
    return scan


def iter_frames(scans: Sequence[SegmentScan]) -> Iterator[Frame]:
    for s in scans:
        yield from s.frames


class SegmentWriter:
    """Appends frames to one open segment file.

    `add` encodes a frame into memory (advancing the checksum chain); `flush` writes
    everything added since the last flush with one write() and one fdatasync(). A frame
    is durable only once a flush that covers it has returned.
    """

    def __init__(self, path: str, fd: int, header: SegmentHeader, size: int, checksum: int):
        self.path = path
        self.fd = fd
        self.header = header
        self.size = size  # bytes durably in the file
        self.checksum = checksum  # chain value after the last added frame
        self._pending: List[bytes] = []
        self.pending_bytes = 0
        self.write_calls = 0
        self.syncs = 0

    @classmethod
    def create(cls, path: str, header: SegmentHeader) -> SegmentWriter:
        """Create a new segment durably: header written and synced, directory entry synced."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, header.encode())
            os.fsync(fd)
            fsync_dir(os.path.dirname(path))
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, header, HEADER_SIZE, header.checksum)

    @classmethod
    def reopen(cls, scan: SegmentScan) -> SegmentWriter:
        """Continue appending to a segment whose valid content ends exactly at its end."""
        assert scan.clean and scan.valid_length == scan.file_size
        fd = os.open(scan.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        return cls(scan.path, fd, scan.header, scan.valid_length, scan.final_checksum)

    def add(self, kind: int, data_version: int, statements: Sequence[str]) -> int:
        """Encode one frame after the others; returns its size. Not durable until flush()."""
        data, crc = encode_frame(kind, data_version, statements, self.checksum)
        self._pending.append(data)
        self.pending_bytes += len(data)
        self.checksum = crc
        return len(data)

    def flush(self) -> int:
        """Make every added frame durable: one write, one fdatasync. Returns bytes written."""
        if not self._pending:
            return 0
        data = b"".join(self._pending)
        _write_all(self.fd, data)
        self.write_calls += 1
        os.fdatasync(self.fd)
        self.syncs += 1
        if os.fstat(self.fd).st_nlink == 0:
            # Writes to a deleted file succeed and go nowhere: never acknowledge those.
            raise FileNotFoundError(errno.ENOENT, "the segment file was deleted while in use", self.path)
        self._pending = []
        self.pending_bytes = 0
        self.size += len(data)
        return len(data)

    def append(self, kind: int, data_version: int, statements: Sequence[str]) -> int:
        """add() then flush(): one durable frame."""
        self.add(kind, data_version, statements)
        return self.flush()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def fsync_dir(path: str) -> None:
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
