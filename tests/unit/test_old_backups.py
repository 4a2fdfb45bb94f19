"""Backups written by an earlier pibackup (tests/fixtures/backups-format1.tar.xz, made by
tests/fixtures/make_old_backups.py) restore equal to the database lightningd had, and verify.
A change of code layout or format that breaks what users already have on their sticks fails here."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

import dbcompare
from helpers import cli, restore_to

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "backups-format1.tar.xz"


@pytest.fixture
def old_backups(tmp_path: Path) -> Path:
    with tarfile.open(FIXTURE) as t:
        t.extractall(tmp_path / "old", filter="tar")
    return tmp_path / "old"


@pytest.mark.parametrize("mode", ["journal", "replica"])
def test_a_backup_written_by_the_first_format_restores_equal_and_verifies(mode, old_backups, tmp_path):
    backup = old_backups / mode
    if mode == "journal":  # the fixture holds what it claims: a compaction's second generation
        assert sorted(p.name for p in backup.glob("gen-*")) == ["gen-000001", "gen-000002"]
        assert list((backup / "gen-000002").glob("snapshot-v*.sqlite3"))
    out = tmp_path / "restored.sqlite3"
    r = restore_to(backup, out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert dbcompare.backup_differences(old_backups / f"{mode}-live.sqlite3", out) == []
    v = cli("verify", str(backup))
    assert v.returncode == 0, v.stdout + v.stderr


def test_segments_started_through_the_appender_have_the_headers_the_writers_wrote_before():
    # The journal writer and compaction wrote their headers field by field; both now go
    # through store/appender. The bytes must be the same, or old readers and sticks break.
    from pibackup.store.appender import SegmentSettings, first_header, next_header
    from pibackup.store.segment import FLAG_DEFLATE, SegmentHeader

    gid, sha, created = b"G" * 16, bytes(range(32)), 1_700_000_000
    for flags in (0, FLAG_DEFLATE):
        old_first = SegmentHeader(
            generation=7, generation_id=gid, segment=1, base_version=4242, snapshot_sha256=sha, created=created, flags=flags
        )
        new_first = first_header(7, 4242, sha, flags, generation_id=gid, created=created)
        assert new_first.encode() == old_first.encode()
        old_next = SegmentHeader(
            generation=7,
            generation_id=gid,
            segment=3,
            base_version=4242,
            snapshot_sha256=sha,
            prev_valid_length=123_456,
            prev_checksum=0xDEADBEEF,
            created=created + 5,
            flags=flags,
        )
        assert next_header(new_first, 3, 123_456, 0xDEADBEEF, flags, created=created + 5).encode() == old_next.encode()
    # The preallocation rule: pibackup-preallocate-kb, at most 1/16 of the snapshot, at least 16 KiB.
    s = SegmentSettings.of(True, 1 << 20)
    assert s.flags == FLAG_DEFLATE and SegmentSettings.of(False, 0).flags == 0
    for snapshot, chunk in ((0, 16384), (100_000, 16384), (1_000_000, 61440), (64 << 20, 1 << 20)):
        old = min(1 << 20, max(16 * 1024, snapshot // 16 // 4096 * 4096))
        assert s.chunk_for(snapshot) == old == chunk
