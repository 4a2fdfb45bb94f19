"""The frame format: round trip, where a journal ends, and what a reader makes of damage."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pibackup.rules.sequence import Action, classify, reconcile
from pibackup.store.reader import SegmentReader, scan_segment
from pibackup.store.segment import FLAG_DEFLATE, HEADER_SIZE, KIND_PRAGMA, KIND_TX, MAX_INFLATED, JournalError, SegmentHeader
from pibackup.store.writer import SegmentWriter, trim_zeros


def make_segment(path: Path, frames, flags: int = 0, preallocate: int = 0, close: bool = True):
    h = SegmentHeader(generation=1, generation_id=os.urandom(16), segment=1, base_version=0, snapshot_sha256=b"\0" * 32, flags=flags)
    w = SegmentWriter.create(str(path), h, preallocate)
    ends = []
    for kind, v, stmts in frames:
        w.append(kind, v, stmts)
        ends.append(w.size)
    if close:
        w.close()
    else:
        os.close(w.fd)  # as a crash leaves it: the zeros written ahead stay
    return ends


FRAMES = [(KIND_TX, v, [f"INSERT INTO t VALUES ({v}, 'é x''{v}')", f"UPDATE vars SET intval={v}"]) for v in range(1, 21)]


ENCODINGS = pytest.mark.parametrize("flags", [0, FLAG_DEFLATE], ids=["plain", "deflate"])


@ENCODINGS
def test_frames_round_trip(tmp_path, flags):
    p = tmp_path / "seg.pbj"
    make_segment(p, FRAMES + [(KIND_PRAGMA, 20, ["PRAGMA foreign_keys = OFF;"])], flags)
    scan = scan_segment(str(p))
    assert scan.clean and scan.valid_length == p.stat().st_size
    assert [(f.kind, f.data_version, f.statements) for f in scan.frames] == [
        (k, v, list(s)) for k, v, s in FRAMES + [(KIND_PRAGMA, 20, ["PRAGMA foreign_keys = OFF;"])]
    ]


@ENCODINGS
def test_a_restarted_stream_reads_whole_and_from_the_restart(tmp_path, flags):
    # Compaction's cut restarts the writer's deflate stream: a reader of the whole segment
    # sees nothing different, and a reader resumed at the cut needs none of the frames before.
    p = tmp_path / "seg.pbj"
    h = SegmentHeader(generation=1, generation_id=os.urandom(16), segment=1, base_version=0, snapshot_sha256=b"\0" * 32, flags=flags)
    w = SegmentWriter.create(str(p), h, 0)
    for kind, v, stmts in FRAMES[:12]:
        w.append(kind, v, stmts)
    cut, seed = w.size, w.checksum
    w.restart_stream()
    for kind, v, stmts in FRAMES[12:]:
        w.add(kind, v, stmts)
    w.flush()
    w.close()
    scan = scan_segment(str(p))
    assert scan.clean and [f.data_version for f in scan.frames] == [v for _, v, _ in FRAMES]
    with SegmentReader(str(p)) as r:
        r.resume_at(cut, seed)
        got = [(f.data_version, f.statements) for f in r.frames()]
        assert r.clean and r.valid_length == p.stat().st_size
    assert got == [(v, list(s)) for _, v, s in FRAMES[12:]]
    if flags:  # without the restart, the frames after the cut refer back to the ones before it
        w2 = SegmentWriter.create(str(tmp_path / "b.pbj"), h, 0)
        for kind, v, stmts in FRAMES:
            w2.append(kind, v, stmts)
        w2.close()
        with SegmentReader(str(tmp_path / "b.pbj")) as r:
            r.resume_at(cut, seed)
            assert [f.data_version for f in r.frames()] != [v for _, v, _ in FRAMES[12:]]


@ENCODINGS
def test_restarts_back_to_back_and_on_an_empty_segment_change_nothing(tmp_path, flags):
    # A compaction that failed after its cut, then another cut before lightningd wrote again;
    # or a cut right after a roll-over: zlib has nothing to flush, and the writer skips it.
    p = tmp_path / "seg.pbj"
    h = SegmentHeader(generation=1, generation_id=os.urandom(16), segment=1, base_version=0, snapshot_sha256=b"\0" * 32, flags=flags)
    w = SegmentWriter.create(str(p), h, 0)
    w.restart_stream()
    w.append(*FRAMES[0])
    w.restart_stream()
    w.restart_stream()
    cut, seed = w.size, w.checksum
    for kind, v, stmts in FRAMES[1:]:
        w.append(kind, v, stmts)
    w.close()
    assert [f.data_version for f in scan_segment(str(p)).frames] == [v for _, v, _ in FRAMES]
    with SegmentReader(str(p)) as r:
        r.resume_at(cut, seed)
        assert [f.data_version for f in r.frames()] == [v for _, v, _ in FRAMES[1:]] and r.clean


@ENCODINGS
def test_truncation_at_every_byte_of_the_last_frame_is_a_torn_tail(tmp_path, flags):
    p = tmp_path / "seg.pbj"
    ends = make_segment(p, FRAMES, flags)
    data = p.read_bytes()
    for cut in range(ends[-2] + 1, ends[-1]):
        scan = scan_segment(str(p), data[:cut])
        assert scan.torn, cut
        assert len(scan.frames) == len(FRAMES) - 1 and scan.valid_length == ends[-2]


@ENCODINGS
def test_every_single_bit_flip_is_detected_and_never_taken_for_a_torn_tail(tmp_path, flags):
    p = tmp_path / "seg.pbj"
    ends = make_segment(p, FRAMES[:3], flags)
    data = bytearray(p.read_bytes())
    good = [(f.data_version, f.statements) for f in scan_segment(str(p)).frames]
    last_frame_start = ends[-2]
    for i in range(len(data) * 8):
        flipped = bytearray(data)
        flipped[i // 8] ^= 1 << (i % 8)
        try:
            scan = scan_segment(str(p), bytes(flipped))
        except JournalError:
            assert i // 8 < HEADER_SIZE
            continue
        got = [(f.data_version, f.statements) for f in scan.frames]
        assert got == good[: len(got)] and not scan.clean, f"bit {i} went unnoticed"
        if scan.bad_offset < last_frame_start:
            assert not scan.torn, f"bit {i}: damage before the last frame taken for a torn tail"


def test_damage_followed_by_valid_frames_is_corruption_not_a_torn_tail(tmp_path):
    p = tmp_path / "seg.pbj"
    ends = make_segment(p, FRAMES)
    data = bytearray(p.read_bytes())
    data[ends[5] + 20] ^= 0xFF  # inside the payload of frame 7
    scan = scan_segment(str(p), bytes(data))
    assert scan.bad_offset == ends[5] and not scan.torn


@pytest.mark.parametrize("field_offset", [0, 8, 9, 12, 15])  # kind, length, length, checksum, checksum
def test_damaged_frame_header_in_the_middle_is_not_a_torn_tail(tmp_path, field_offset):
    p = tmp_path / "seg.pbj"
    ends = make_segment(p, FRAMES)
    data = bytearray(p.read_bytes())
    data[ends[5] + field_offset] ^= 0x80
    scan = scan_segment(str(p), bytes(data))
    assert scan.bad_offset == ends[5] and not scan.torn


def test_a_zeroed_sector_in_the_middle_is_damage_but_zeros_to_the_end_are_unused_space(tmp_path):
    p = tmp_path / "seg.pbj"
    ends = make_segment(p, FRAMES)
    data = bytearray(p.read_bytes())
    mid = bytearray(data)
    mid[ends[5] : ends[5] + 512] = bytes(512)
    scan = scan_segment(str(p), bytes(mid))
    assert not scan.clean and not scan.torn
    tail = bytes(data[: ends[-2]]) + bytes(len(data) - ends[-2])  # the last append's pages never written
    scan = scan_segment(str(p), tail)
    assert scan.clean and scan.valid_length == ends[-2] and len(scan.frames) == len(FRAMES) - 1


def make_preallocated(path: Path, frames, chunk: int = 4096):
    return make_segment(path, frames, FLAG_DEFLATE, preallocate=chunk, close=False)


def test_closing_a_segment_gives_back_its_preallocated_zeros(tmp_path):
    p = tmp_path / "seg.pbj"
    ends = make_segment(p, FRAMES, FLAG_DEFLATE, preallocate=64 * 1024)
    assert p.stat().st_size == ends[-1]
    scan = scan_segment(str(p))
    assert scan.clean and len(scan.frames) == len(FRAMES) and scan.valid_length == ends[-1]


def test_preallocated_segment_reads_clean_and_tears_like_any_other(tmp_path):
    p = tmp_path / "seg.pbj"
    ends = make_preallocated(p, FRAMES)
    data = p.read_bytes()
    assert len(data) % 4096 == 0 and len(data) > ends[-1]
    scan = scan_segment(str(p))
    assert scan.clean and len(scan.frames) == len(FRAMES) and scan.valid_length == ends[-1]
    # The last append was cut short by a power cut: its tail never reached the stick.
    for cut in range(ends[-2] + 17, ends[-1], 7):
        torn = data[:cut] + bytes(len(data) - cut)
        scan = scan_segment(str(p), torn)
        assert scan.torn and len(scan.frames) == len(FRAMES) - 1, cut
    # A flipped bit in an earlier frame is damage, as without preallocation.
    bad = bytearray(data)
    bad[ends[3] + 20] ^= 1
    scan = scan_segment(str(p), bytes(bad))
    assert not scan.clean and not scan.torn and scan.bad_offset == ends[3]


def test_a_newer_format_version_is_refused_before_anything_else(tmp_path):
    p = tmp_path / "seg.pbj"
    make_segment(p, FRAMES[:2])
    data = bytearray(p.read_bytes())
    data[9] = 2
    with pytest.raises(JournalError, match="format version 2"):
        scan_segment(str(p), bytes(data))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(min_value=0, max_value=4000))
def test_reader_survives_any_bytes_after_a_valid_header(tmp_path_factory, garbage, cut):
    p = tmp_path_factory.mktemp("fuzz") / "seg.pbj"
    make_segment(p, FRAMES[:4])
    data = p.read_bytes()
    data = data[: max(HEADER_SIZE, min(cut, len(data)))] + garbage
    scan = scan_segment(str(p), data)
    for f in scan.frames:
        assert f.data_version in range(1, 5)


@ENCODINGS
def test_random_damage_is_always_detected(tmp_path, flags):
    rng = random.Random(7)
    p = tmp_path / "seg.pbj"
    make_segment(p, FRAMES, flags)
    data = p.read_bytes()
    good = [(f.data_version, f.statements) for f in scan_segment(str(p)).frames]
    boundaries = {HEADER_SIZE} | {f.offset for f in scan_segment(str(p)).frames}
    last_frame_start = max(boundaries)
    for _ in range(1000):
        d = bytearray(data)
        what = rng.choice(["flip", "truncate", "garbage"])
        if what == "flip":
            pos = rng.randrange(HEADER_SIZE, len(d))
            d[pos] ^= 1 << rng.randrange(8)
        elif what == "truncate":
            d = d[: rng.randrange(HEADER_SIZE, len(d))]
        else:
            garbage = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 100)))
            if not garbage.strip(b"\0"):
                garbage += b"\x01"  # zeros to end of file are unused preallocated space by FORMAT.md
            d += garbage
        scan = scan_segment(str(p), bytes(d))
        got = [(f.data_version, f.statements) for f in scan.frames]
        assert got == good[: len(got)]
        if what == "truncate" and len(d) in boundaries:
            # A cut exactly between frames leaves a shorter, valid journal: no log format can
            # tell (FORMAT.md); the next segment's header, or lightningd's next data_version
            # (a gap), is what reveals it.
            assert scan.clean and len(got) == sorted(boundaries).index(len(d))
        else:
            assert not scan.clean, what
        if what == "flip" and scan.bad_offset < last_frame_start:
            assert not scan.torn, "damage before the last frame taken for a torn tail"


@pytest.mark.parametrize(
    "last, version, pragma, journaled, expected",
    [
        (5, 6, False, True, Action.APPEND),
        (5, 5, False, True, Action.REWIND),
        (5, 5, True, True, Action.PRAGMA),
        (5, 5, False, False, Action.BEHIND),  # a snapshot's version is committed: never rewound
        (5, 9, False, True, Action.GAP),
        (5, 6, True, True, Action.GAP),  # PRAGMA reports the live version: one we never saw
        (5, 3, False, True, Action.BEHIND),
        (None, 1, False, False, Action.GAP),
        (0xFFFFFFFF, 0, False, True, Action.APPEND),  # data_version wraps
        (0xFFFFFFFF, 0xFFFFFFF0, False, True, Action.BEHIND),
    ],
)
def test_sequence_rules(last, version, pragma, journaled, expected):
    assert classify(last, version, pragma, journaled) is expected


@pytest.mark.parametrize(
    "last, unconfirmed, calls, live, expected",
    [
        # The backup's newest transaction is known committed (a commit mark or a PRAGMA after it).
        (100, False, [(101, False), (102, False)], 102, Action.APPEND),
        (100, False, [], 100, Action.APPEND),
        (100, False, [(104, False)], 104, Action.GAP),
        (100, False, [], 105, Action.GAP),
        (100, False, [(50, False)], 50, Action.BEHIND),
        (100, False, [], 60, Action.BEHIND),
        # Answered by a plugin that is gone, never confirmed: only its resend may follow.
        (101, True, [(101, False), (102, False)], 102, Action.APPEND),  # rewind among early calls
        (101, True, [], 100, Action.APPEND),  # answered, never committed: lightningd will resend it
        (100, True, [(101, False), (102, False)], 102, Action.GAP),  # was 100 ours? cannot tell
        (100, True, [], 100, Action.GAP),
        (100, True, [(100, True)], 100, Action.GAP),  # a PRAGMA proves a commit, not whose
        (100, True, [(50, False)], 50, Action.BEHIND),
    ],
)
def test_reconcile_at_init(last, unconfirmed, calls, live, expected):
    assert reconcile(last, unconfirmed, calls, live) is expected


def test_deflate_frames_are_smaller_and_a_plain_frame_in_a_deflate_segment_is_refused(tmp_path):
    plain, packed = tmp_path / "p.pbj", tmp_path / "d.pbj"
    make_segment(plain, FRAMES)
    make_segment(packed, FRAMES, FLAG_DEFLATE)
    assert packed.stat().st_size < plain.stat().st_size * 0.6
    # A frame header copied in from a plain segment does not decode in a deflate one.
    data = packed.read_bytes() + plain.read_bytes()[HEADER_SIZE:]
    scan = scan_segment(str(packed), data)
    assert len(scan.frames) == len(FRAMES) and not scan.clean


def test_trimming_cuts_only_zeros(tmp_path):
    p = tmp_path / "seg.pbj"
    ends = make_preallocated(p, FRAMES, chunk=64 * 1024)
    assert p.stat().st_size == 64 * 1024
    assert not trim_zeros(str(p), ends[-2])  # the last frame is not zeros: left alone
    assert p.stat().st_size == 64 * 1024
    assert trim_zeros(str(p), ends[-1])
    assert p.stat().st_size == ends[-1]
    assert not trim_zeros(str(p), ends[-1])  # nothing left to give back
    scan = scan_segment(str(p))
    assert scan.clean and len(scan.frames) == len(FRAMES)


@ENCODINGS
def test_a_transaction_no_reader_would_accept_is_refused_by_the_writer_and_the_segment_goes_on(tmp_path, flags):
    # Readers treat a payload that inflates past MAX_INFLATED as damage; acknowledging one
    # would make it unrestorable, so the writer refuses it before writing anything.
    p = tmp_path / "seg.pbj"
    h = SegmentHeader(generation=1, generation_id=os.urandom(16), segment=1, base_version=0, snapshot_sha256=b"\0" * 32, flags=flags)
    w = SegmentWriter.create(str(p), h)
    w.append(*FRAMES[0])
    huge = "INSERT INTO datastore VALUES (x'" + "ab" * (MAX_INFLATED // 2 + 1) + "')"
    with pytest.raises(JournalError, match="at most 16 MiB per transaction"):
        w.append(KIND_TX, 2, [huge])
    w.append(*FRAMES[1])  # the compressor's stream was not touched by the refused frame
    w.close()
    assert [f.data_version for f in scan_segment(str(p)).frames] == [1, 2]
