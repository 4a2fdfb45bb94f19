"""Appending frames to one segment file: create it atomically, write ahead zeros, sync, trim.

A frame is durable only once a flush that covers it returned (FORMAT.md: preallocation, trimming).
"""

from __future__ import annotations

import errno
import mmap
import os
import zlib
from typing import Callable, List, Optional, Sequence

from pibackup.store.fsio import IO_CHUNK, fsync_dir
from pibackup.store.layout import TMP_SUFFIX
from pibackup.store.segment import DEFLATE_LEVEL, FLAG_DEFLATE, HEADER_SIZE, SYNC_TAIL, SegmentHeader, encode_frame

# Sector sizes a direct write is aligned to, tried in order (512-byte sectors: USB sticks, SD
# cards, loop devices; 4 KiB: "4Kn" disks). The tail kept in memory covers the biggest.
DIRECT_ALIGN = (512, 4096)
TAIL_BLOCK = DIRECT_ALIGN[-1]


class SegmentLeftBehind(OSError):
    """A segment whose creation failed after its rename, and whose removal failed too."""


class SegmentWriter:
    """Appends frames to one open segment file.

    `add` encodes a frame into memory (advancing the checksum chain); `flush` writes
    everything added since the last flush with one write() and one fdatasync(). A frame
    is durable only once a flush that covers it has returned.
    """

    # Told (writer, offset, bytes) after each flush's write and before its sync, so that a copy
    # elsewhere (remote/: pibackup-remote) takes the bytes while the local sync runs. It must
    # not raise and not block; None (the default) costs one attribute read per flush.
    observer: Optional[Callable[[SegmentWriter, int, bytes], None]] = None

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
        self.direct_writes = 0  # flushes written with O_DIRECT (sectors only, no page writeback)
        self._direct: Optional[bool] = None  # None: not tried yet; False: the file system refused it
        self._direct_fd = -1
        self._align = DIRECT_ALIGN[0]
        self._tail = b""  # bytes [size // TAIL_BLOCK * TAIL_BLOCK, size): the start of a direct write
        self._tail_known = False
        self._buf: Optional[mmap.mmap] = None  # page-aligned, as O_DIRECT wants

    @classmethod
    def create(cls, path: str, header: SegmentHeader, preallocate: int = 0) -> SegmentWriter:
        """Create a new segment durably and atomically: the header is written to PATH.tmp and
        synced, then renamed, then the directory is synced. A segment never exists without
        its whole header."""
        tmp = path + TMP_SUFFIX
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
            assert out == b"\x00" + SYNC_TAIL, out
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
        if not self._write_direct(data):
            _pwrite_all(self.fd, data, self.size)
            self._tail_known = False
        self.write_calls += 1
        observer = SegmentWriter.observer  # through the class: a function stays unbound
        if observer is not None:
            observer(self, self.size, data)
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

    def _write_direct(self, data: bytes) -> bool:
        """Write `data` at `size` with O_DIRECT, whole sectors only, inside the zeros written
        ahead; False (nothing written) where that cannot be done. Why: a buffered append
        dirties the file system's whole block (4 KiB on ext4) and fdatasync writes it all;
        a direct write of the one or two 512-byte sectors the frame touches writes a
        quarter of that or less, and inside written zeros it changes no metadata, so the
        fdatasync after it only flushes the device's cache. The sector holding the end of
        the frame before is written again with the same bytes, as a buffered append
        writes its block again: no more at risk from a torn write than before. The
        padding to the sector's end is zeros, which readers take for unused space."""
        if self._direct is False:
            return False
        end = self.size + len(data)
        while True:
            align = self._align
            start = self.size // align * align
            stop = -(-end // align) * align
            if stop > self.allocated:
                return False  # a write past the zeros would change the file's size: buffered
            if self._direct_fd < 0:
                try:
                    self._direct_fd = os.open(self.path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC | os.O_NOFOLLOW)
                except OSError:
                    self._direct = False  # tmpfs, some FUSE file systems: buffered writes
                    return False
                if os.fstat(self._direct_fd).st_ino != os.fstat(self.fd).st_ino:
                    self._give_up_direct()  # not the file being written (renamed away meanwhile)
                    return False
            buf = self._region(start, data, stop)
            try:
                written = os.pwrite(self._direct_fd, buf, start)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                # A device with bigger sectors refuses the alignment: try the next, then buffered.
                bigger = [a for a in DIRECT_ALIGN if a > align]
                if not bigger:
                    self._give_up_direct()
                    return False
                self._align = bigger[0]
                del buf  # the buffer may be replaced by a bigger one: no view of it may remain
                continue
            if written < len(buf):  # rare for direct I/O: the rest goes through the page cache
                _pwrite_all(self.fd, bytes(buf[written:]), start + written)
            self._direct = True
            self.direct_writes += 1
            keep = end // TAIL_BLOCK * TAIL_BLOCK
            self._tail = bytes(self._whole[keep - self._tail_start : end - self._tail_start])
            self._tail_start = keep
            return True

    _tail_start = 0
    _whole = memoryview(b"")

    def _region(self, start: int, data: bytes, stop: int) -> memoryview:
        """The bytes [start, stop) as they must be: the valid bytes before `size`, `data`,
        zeros up to `stop`; in a page-aligned buffer."""
        t0 = self.size // TAIL_BLOCK * TAIL_BLOCK
        if not self._tail_known or self._tail_start != t0 or len(self._tail) != self.size - t0:  # stale after a failed flush
            self._tail = os.pread(self.fd, self.size - t0, t0)  # what this writer wrote and synced
            if len(self._tail) != self.size - t0:
                raise OSError(errno.EIO, "the segment is shorter than what was written to it", self.path)
            self._tail_start, self._tail_known = t0, True
        need = stop - t0
        if self._buf is None or len(self._buf) < need:
            self._whole = memoryview(b"")
            if self._buf is not None:
                self._buf.close()
            self._buf = mmap.mmap(-1, max(need, 64 * 1024))
        buf = self._buf
        n = len(self._tail)
        buf[:n] = self._tail
        buf[n : n + len(data)] = data
        buf[n + len(data) : need] = bytes(need - n - len(data))
        self._whole = memoryview(buf)[:need]
        return self._whole[start - t0 :]

    def _give_up_direct(self) -> None:
        self._direct = False
        if self._direct_fd >= 0:
            os.close(self._direct_fd)
            self._direct_fd = -1

    def _extend(self, end: int) -> None:
        """Write zeros ahead, in whole chunks, and sync them once: afterwards an append only
        overwrites blocks that exist, so its fdatasync flushes data and no metadata (the
        file's size and extents stay as they are). Readers take trailing zeros for unused
        space (FORMAT.md)."""
        new = -(-end // self.preallocate) * self.preallocate  # up to a whole chunk
        zeros = bytes(min(new - self.allocated, IO_CHUNK))
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
        if self._direct_fd >= 0:
            os.close(self._direct_fd)
            self._direct_fd = -1
        self._whole = memoryview(b"")
        if self._buf is not None:
            self._buf.close()
            self._buf = None
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
        b = os.pread(fd, min(IO_CHUNK, end - pos), pos)
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
