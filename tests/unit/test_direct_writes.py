"""Appends written with O_DIRECT (whole sectors inside the zeros written ahead) leave exactly the
bytes a buffered append leaves, and fall back to buffered writes where the file system or the
device refuses them."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest

from pibackup.store import writer as wr
from pibackup.store.reader import scan_segment
from pibackup.store.segment import FLAG_DEFLATE, KIND_TX, SegmentHeader
from pibackup.store.writer import SegmentWriter

HEADER = SegmentHeader(generation=1, generation_id=b"g" * 16, segment=1, base_version=0, snapshot_sha256=b"\0" * 32)


def direct_supported(where: Path) -> bool:
    probe = where / "probe"
    probe.write_bytes(b"")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_DIRECT))
        return True
    except OSError:
        return False


def frames(seed: int):
    rnd = random.Random(seed)
    out = []
    for v in range(1, 120):
        size = rnd.choice([10, 200, 511, 512, 513, 3000, 4095, 9000])
        blob = rnd.randbytes(size // 2).hex()  # random: deflate keeps it about this long
        out.append((KIND_TX, v, [f"UPDATE t SET b=X'{blob}' WHERE id={v}"]))
    return out


def write(path: Path, flags: int, preallocate: int, batch: int = 1) -> SegmentWriter:
    w = SegmentWriter.create(str(path), SegmentHeader(**{**HEADER.__dict__, "flags": flags}), preallocate)
    for k, (kind, v, stmts) in enumerate(frames(7), start=1):
        w.add(kind, v, stmts)
        if k % batch == 0:
            w.flush()
    w.flush()
    return w


@pytest.mark.parametrize("flags", [0, FLAG_DEFLATE], ids=["plain", "deflate"])
@pytest.mark.parametrize("batch", [1, 5])
def test_direct_appends_leave_the_bytes_a_buffered_append_leaves(tmp_path, flags, batch):
    if not direct_supported(tmp_path):
        pytest.skip("this file system takes no O_DIRECT")
    buffered = write(tmp_path / "buffered.pbj", flags, 0, batch)
    # 8 KiB chunks: many appends cross the end of the zeros, which are extended first.
    direct = write(tmp_path / "direct.pbj", flags, 8 * 1024, batch)
    assert buffered.direct_writes == 0 and direct.direct_writes == direct.write_calls
    assert direct.size == buffered.size
    data = (tmp_path / "direct.pbj").read_bytes()
    assert data[: direct.size] == (tmp_path / "buffered.pbj").read_bytes()
    assert data[direct.size :].count(0) == len(data) - direct.size  # padding and zeros ahead only
    scan = scan_segment(str(tmp_path / "direct.pbj"))
    assert scan.clean and len(scan.frames) == len(frames(7))
    for w in (buffered, direct):
        w.close()
    assert (tmp_path / "direct.pbj").read_bytes() == (tmp_path / "buffered.pbj").read_bytes()  # zeros given back


def test_a_device_refusing_small_sectors_gets_4k_ones_and_then_buffered_writes(tmp_path, monkeypatch):
    if not direct_supported(tmp_path):
        pytest.skip("this file system takes no O_DIRECT")
    real = os.pwrite
    refused = {"below": 4096}

    def pwrite(fd, data, offset):
        if fd == getattr(current, "_direct_fd", None) and (offset % refused["below"] or len(data) % refused["below"]):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(wr.os, "pwrite", pwrite)
    current = SegmentWriter.create(str(tmp_path / "4k.pbj"), HEADER, 64 * 1024)
    for kind, v, stmts in frames(3)[:30]:
        current.append(kind, v, stmts)
    assert current._align == 4096 and current.direct_writes == 30
    current.close()
    assert scan_segment(str(tmp_path / "4k.pbj")).clean

    refused["below"] = 1 << 30  # refuses every direct write: all go through the page cache
    current = SegmentWriter.create(str(tmp_path / "none.pbj"), HEADER, 64 * 1024)
    for kind, v, stmts in frames(3)[:30]:
        current.append(kind, v, stmts)
    assert current.direct_writes == 0 and current.write_calls == 30
    current.close()
    scan = scan_segment(str(tmp_path / "none.pbj"))
    assert scan.clean and len(scan.frames) == 30


def test_a_file_system_without_o_direct_gets_buffered_writes(tmp_path, monkeypatch):
    real = os.open

    def no_direct(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(path, flags, *a)

    monkeypatch.setattr(wr.os, "open", no_direct)
    w = SegmentWriter.create(str(tmp_path / "seg.pbj"), HEADER, 64 * 1024)
    for kind, v, stmts in frames(5)[:20]:
        w.append(kind, v, stmts)
    assert w.direct_writes == 0 and w.write_calls == 20
    w.close()
    scan = scan_segment(str(tmp_path / "seg.pbj"))
    assert scan.clean and len(scan.frames) == 20


def test_a_flush_that_failed_after_its_write_is_retried_from_the_durable_end(tmp_path, monkeypatch):
    """The sync fails (EIO): the frames stay pending and the size where it was; the retry
    writes them again at the same place, from the segment's durable end, not from the tail
    the failed write had left in memory."""
    w = SegmentWriter.create(str(tmp_path / "seg.pbj"), HEADER, 64 * 1024)
    fs = frames(9)[:12]
    for kind, v, stmts in fs[:5]:
        w.append(kind, v, stmts)
    real = os.fdatasync
    fail = {"left": 1}

    def fdatasync(fd):
        if fail["left"]:
            fail["left"] -= 1
            raise OSError(errno.EIO, "Input/output error")
        return real(fd)

    monkeypatch.setattr(wr.os, "fdatasync", fdatasync)
    kind, v, stmts = fs[5]
    w.add(kind, v, stmts)
    size = w.size
    with pytest.raises(OSError):
        w.flush()
    assert w.size == size and w.pending_bytes > 0
    w.flush()  # the retry
    for kind, v, stmts in fs[6:]:
        w.append(kind, v, stmts)
    w.close()
    scan = scan_segment(str(tmp_path / "seg.pbj"))
    assert scan.clean and [f.data_version for f in scan.frames] == [v for _, v, _ in fs]
