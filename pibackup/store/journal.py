"""The on-disk journal: segment headers, frames, and the rule for where a journal ends.

Byte layout is specified in FORMAT.md; this module is its only implementation.
"""

from __future__ import annotations

import errno
import io
import os
import struct
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator, List, Optional, Sequence, Tuple

from pibackup.errors import PibackupError
from pibackup.store.fsio import fsync_dir
from pibackup.store.fsio import fsync_file as fsync_file  # moved: removed in the sweep

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
ENCODING_DEFLATE = 1  # the payload continues the segment's raw deflate stream (FORMAT.md)
ENCODINGS = (ENCODING_PLAIN, ENCODING_DEFLATE)
FLAG_DEFLATE = 1  # segment header flag: every frame in the segment uses ENCODING_DEFLATE
DEFLATE_LEVEL = 6  # measured on the recordings: level 9 saves <1% for twice the CPU
_SYNC_TAIL = b"\x00\x00\xff\xff"  # what Z_SYNC_FLUSH ends with; stripped on disk

# A frame larger than this is treated as damage, not as a frame: lightningd's
# biggest transaction (the schema) is ~100 KB; a corrupt length must not make a
# reader allocate gigabytes.
MAX_PAYLOAD = 256 * 1024 * 1024
# What one deflate frame may inflate to. Deflate expands up to ~1000x, so without a cap a
# small damaged or planted segment makes a reader allocate hundreds of MiB. lightningd's
# biggest transaction in the recordings (its schema) is ~21 KB; a frame past this is damage.
MAX_INFLATED = 16 * 1024 * 1024

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
        assert packed.endswith(_SYNC_TAIL)
        payload, encoding = packed[: -len(_SYNC_TAIL)], ENCODING_DEFLATE
    head = _FRAME.pack(kind, encoding, 0, data_version & 0xFFFFFFFF, len(payload))
    crc = zlib.crc32(payload, zlib.crc32(head, prev_checksum))
    return head + _U32.pack(crc) + payload, crc


@dataclass(frozen=True)
class Frame:
    kind: int
    data_version: int
    statements: List[str]
    offset: int  # of the frame header in its segment file
    checksum: int
    encoding: int = ENCODING_PLAIN
    payload: bytes = field(default=b"", repr=False)  # as stored; dropped once decoded


_FRAME_STARTS = tuple(bytes([k, e, 0, 0]) for k in KINDS for e in ENCODINGS)
_CHUNK = 64 * 1024  # zero scans and preallocation: small buffers, so two writers at once (compaction) stay light


class SegmentLeftBehind(OSError):
    """A segment whose creation failed after its rename, and whose removal failed too."""


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
                payload = self._inflate.decompress(payload + _SYNC_TAIL, MAX_INFLATED + 1)
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
        kind, encoding, reserved, version, length = _FRAME.unpack_from(head)
        (stored,) = _U32.unpack_from(head, _FRAME.size)
        if kind not in KINDS or encoding not in ENCODINGS or reserved != 0 or length > MAX_PAYLOAD:
            return None, "not a frame header", self.file_size
        start = pos + FRAME_HEADER_SIZE
        if start + length > self.file_size:
            return None, "frame runs past the end of the file", self.file_size
        payload = f.read(length)
        if zlib.crc32(payload, zlib.crc32(head[: _FRAME.size], seed)) != stored:
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
        kind, encoding, reserved, _, length = _FRAME.unpack_from(head)
        plausible = kind in KINDS and encoding in ENCODINGS and reserved == 0 and length <= MAX_PAYLOAD
        end = pos + FRAME_HEADER_SIZE + length
        if not plausible or (end < self.file_size and not self._zero_from(end)):
            return False
        (stored,) = _U32.unpack_from(head, _FRAME.size)
        return not self._resyncs(pos + FRAME_HEADER_SIZE, stored)

    def _zero_from(self, pos: int) -> bool:
        self._f.seek(pos)
        while True:
            b = self._f.read(_CHUNK)
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


class SegmentWriter:
    """Appends frames to one open segment file.

    `add` encodes a frame into memory (advancing the checksum chain); `flush` writes
    everything added since the last flush with one write() and one fdatasync(). A frame
    is durable only once a flush that covers it has returned.
    """

    def __init__(self, path: str, fd: int, header: SegmentHeader, size: int, checksum: int, preallocate: int = 0):
        self.path = path
        self.fd = fd
        self.header = header
        self.size = size  # bytes of valid content, durably in the file
        self.allocated = size  # the file's length: zeros beyond `size`
        self.preallocate = preallocate
        self.checksum = checksum  # chain value after the last added frame
        self._pending: List[bytes] = []
        self.pending_bytes = 0
        self._deflate = zlib.compressobj(DEFLATE_LEVEL, zlib.DEFLATED, -15, 9) if header.flags & FLAG_DEFLATE else None
        self.write_calls = 0
        self.syncs = 0

    @classmethod
    def create(cls, path: str, header: SegmentHeader, preallocate: int = 0) -> SegmentWriter:
        """Create a new segment durably and atomically: the header is written to PATH.tmp and
        synced, then renamed, then the directory is synced. A segment never exists without
        its whole header."""
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)  # read too: trimming checks for zeros
        renamed = False
        try:
            _write_all(fd, header.encode())
            os.fsync(fd)
            os.rename(tmp, path)
            renamed = True
            fsync_dir(os.path.dirname(path))
        except BaseException as e:
            os.close(fd)
            try:
                # A caller that goes on without this segment must not leave it behind: it
                # would claim to continue a segment that keeps growing. Once renamed, only
                # a synced removal makes it gone.
                os.unlink(path if renamed else tmp)
                if renamed:
                    fsync_dir(os.path.dirname(path))
            except OSError:
                if renamed and isinstance(e, OSError):
                    raise SegmentLeftBehind(e.errno or 0, f"{e.strerror or e}; and the new segment could not be removed", path) from e
            raise
        return cls(path, fd, header, HEADER_SIZE, header.checksum, preallocate)

    def restart_stream(self) -> None:
        """Frames added from now on inflate without the ones before (FORMAT.md: a full
        flush; its output, an empty stored block, is dropped like the sync flush's tail).
        Only between flushed frames. Nothing to do when no frame was added since the
        segment began or the last restart (zlib would then have nothing to flush)."""
        assert not self._pending, "restart_stream with frames not yet flushed"
        if self._deflate is not None and self._dirty:
            out = self._deflate.flush(zlib.Z_FULL_FLUSH)
            assert out == b"\x00" + _SYNC_TAIL, out
            self._dirty = False

    _dirty = False  # frames were compressed since the stream began or was restarted

    def preallocate_ahead(self, chunk: int) -> None:
        """Turn preallocation on (a compaction's new segment, just before the switch) and
        write the first chunk of zeros now, so the hook's first append does not."""
        self.preallocate = chunk
        if chunk and self.allocated <= self.size:
            self._extend(self.size + 1)

    def add(self, kind: int, data_version: int, statements: Sequence[str]) -> int:
        """Encode one frame after the others; returns its size. Not durable until flush()."""
        data, crc = encode_frame(kind, data_version, statements, self.checksum, self._deflate)
        self._dirty = True
        self._pending.append(data)
        self.pending_bytes += len(data)
        self.checksum = crc
        return len(data)

    def flush(self) -> int:
        """Make every added frame durable: one write, one fdatasync. Returns bytes written."""
        if not self._pending:
            return 0
        data = b"".join(self._pending)
        end = self.size + len(data)
        if self.preallocate and end > self.allocated:
            self._extend(end)
        _pwrite_all(self.fd, data, self.size)
        self.write_calls += 1
        os.fdatasync(self.fd)
        self.syncs += 1
        if os.fstat(self.fd).st_nlink == 0:
            # Writes to a deleted file succeed and go nowhere: never acknowledge those.
            raise FileNotFoundError(errno.ENOENT, "the segment file was deleted while in use", self.path)
        self._pending = []
        self.pending_bytes = 0
        self.size += len(data)
        self.allocated = max(self.allocated, self.size)  # also when nothing is preallocated
        return len(data)

    def _extend(self, end: int) -> None:
        """Write zeros ahead, in whole chunks, and sync them once: afterwards an append only
        overwrites blocks that exist, so its fdatasync flushes data and no metadata (the
        file's size and extents stay as they are). Readers take trailing zeros for unused
        space (FORMAT.md)."""
        new = -(-end // self.preallocate) * self.preallocate  # up to a whole chunk
        zeros = bytes(min(new - self.allocated, _CHUNK))
        pos = self.allocated
        while pos < new:
            n = os.pwrite(self.fd, zeros[: new - pos], pos)
            pos += n
        os.fsync(self.fd)
        self.allocated = new

    def append(self, kind: int, data_version: int, statements: Sequence[str]) -> int:
        """add() then flush(): one durable frame."""
        self.add(kind, data_version, statements)
        return self.flush()

    def close(self, trim: bool = True) -> None:
        """Close the file; with `trim`, first give back the zeros written ahead of the last
        frame (trim_zeros). A failed trim leaves them: the file is valid either way."""
        if self.fd < 0:
            return
        fd, self.fd = self.fd, -1
        try:
            if trim and self.allocated > self.size:
                _trim_fd(fd, self.size, self.allocated)
        except OSError:
            pass
        finally:
            os.close(fd)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _trim_fd(fd: int, length: int, end: int) -> bool:
    """Cut the file to `length` if everything from there to `end` (its size) is zeros; sync.

    The sync is not for the data (valid with or without the zeros) but for FAT: there a
    truncate shortens the cluster chain at once while the directory entry keeps the old
    size until written, and a power cut between the two leaves a file whose end cannot be
    read. Returns whether it cut."""
    pos = length
    while pos < end:
        b = os.pread(fd, min(_CHUNK, end - pos), pos)
        if not b:
            break
        if b.count(0) != len(b):
            return False  # never cut anything but the zeros written ahead
        pos += len(b)
    os.ftruncate(fd, length)
    os.fsync(fd)
    return True


def trim_zeros(path: str, length: int) -> bool:
    """Give back a closed segment's preallocated zeros after its valid `length` bytes."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        end = os.fstat(fd).st_size
        return end > length and _trim_fd(fd, length, end)
    finally:
        os.close(fd)
