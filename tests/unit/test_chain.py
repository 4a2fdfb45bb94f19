"""The chain reader: walk_segment finds the valid end of a segment as the segment reader does."""

from __future__ import annotations

import os
from pathlib import Path

from pibackup.store.chain import End, Walk, iter_frames, walk_segment
from pibackup.store.directory import Generation
from pibackup.store.reader import SegmentReader
from pibackup.store.segment import FLAG_DEFLATE, HEADER_SIZE, KIND_TX, SegmentHeader
from pibackup.store.writer import SegmentWriter


def write_segment(path: Path, count: int, flags: int = 0) -> list:
    h = SegmentHeader(generation=1, generation_id=os.urandom(16), segment=1, base_version=0, snapshot_sha256=b"\0" * 32, flags=flags)
    w = SegmentWriter.create(str(path), h)
    ends = []
    for v in range(1, count + 1):
        w.append(KIND_TX, v, [f"INSERT INTO t VALUES ({v}, '{'x' * v}')"])
        ends.append(w.size)
    w.close()
    return ends


def test_a_walk_ends_where_the_reader_ends_plain_and_deflated(tmp_path: Path) -> None:
    for flags in (0, FLAG_DEFLATE):
        seg = tmp_path / f"seg-{flags}.pbj"
        write_segment(seg, 20, flags)
        with SegmentReader(str(seg)) as r:
            last = list(r.frames())[-1]
            valid, checksum = r.valid_length, r.final_checksum
        w = walk_segment(Walk(str(seg)), os.path.getsize(seg))
        assert (w.offset, w.checksum, w.data_version) == (valid, checksum, last.data_version)


def test_a_walk_goes_on_where_it_stopped_and_stops_at_a_torn_frame(tmp_path: Path) -> None:
    seg = tmp_path / "seg-000001.pbj"
    ends = write_segment(seg, 10)
    w = walk_segment(Walk(str(seg)), ends[3] + 5)  # a cut inside the fifth frame
    assert (w.offset, w.data_version) == (ends[3], 4)
    w = walk_segment(w, ends[-1])
    assert (w.offset, w.data_version) == (ends[-1], 10)
    with open(seg, "r+b") as f:
        f.seek(ends[6] + 20)
        f.write(b"\xff")  # damage inside the eighth frame's payload
    w = walk_segment(Walk(str(seg)), ends[-1])
    assert (w.offset, w.data_version) == (ends[6], 7)


def test_a_walk_of_a_segment_without_its_header_finds_nothing(tmp_path: Path) -> None:
    seg = tmp_path / "seg-000001.pbj"
    seg.write_bytes(b"\0" * (HEADER_SIZE - 1))
    w = walk_segment(Walk(str(seg)), HEADER_SIZE - 1)
    assert (w.offset, w.data_version) == (HEADER_SIZE, None)


def test_iter_frames_stops_at_a_byte_limit_of_the_last_segment(tmp_path: Path) -> None:
    gen = tmp_path / "gen-000001"
    gen.mkdir()
    ends = write_segment(gen / "seg-000001.pbj", 6)
    g = Generation(1, str(gen), [], [str(gen / "seg-000001.pbj")])
    assert [f.data_version for f, _ in iter_frames(g, End())] == [1, 2, 3, 4, 5, 6]
    end = End()
    assert [f.data_version for f, _ in iter_frames(g, end, ends[2])] == [1, 2, 3]
    assert end.segments == 1 and end.torn_tail is None
