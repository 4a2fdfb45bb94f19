"""Backups written by an earlier pibackup (tests/fixtures/backups-format1.tar.xz, made by
tests/fixtures/make_old_backups.py) restore equal to the database lightningd had, and verify.
A change of code layout or format that breaks what users already have on their sticks fails here."""

from __future__ import annotations

import pytest

import dbcompare
from helpers import cli, restore_to


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


def test_a_format1_journal_backup_is_continued_by_the_writer_and_compacted_into_a_compressed_snapshot(old_backups, tmp_path):
    """The writer of this release goes on appending to a format 1 backup's newest generation
    (no new generation from the live database), makes the marker format 2 first, and its
    compaction turns the plain snapshot and journal into a compressed snapshot. The whole
    history restores equal to the live database, and verifies."""
    import shutil
    import time

    import driver

    backup = old_backups / "journal"
    assert (backup / "PIBACKUP").read_text() == "pibackup backup directory\nformat 1\n"
    records = driver.load_trace("A")
    second = driver.first_run(records[len(driver.first_run(records)) :])  # lightningd's next start on that database
    netdir = tmp_path / "node" / "lightning" / "regtest"
    netdir.mkdir(parents=True)
    shutil.copyfile(old_backups / "journal-live.sqlite3", netdir / "lightningd.sqlite3")
    opts = {"pibackup-destination": str(backup), "pibackup-segment-size": "128K", "pibackup-compact-ratio": "0"}
    node = driver.Node(tmp_path / "node", opts)
    calls = [r for r in second if not r.pre_init]
    try:
        node.start([r for r in second if r.pre_init])
        node.calls(calls[:100])
        assert (backup / "PIBACKUP").read_text() == "pibackup backup directory\nformat 2\n"
        assert sorted(p.name for p in backup.glob("gen-*")) == ["gen-000001", "gen-000002"]  # continued
        assert node.rpc("pibackup-compact")["compaction"] == "started"
        for _ in range(600):
            c = node.rpc("pibackup-status")["compaction"]
            if c.get("runs", 0) >= 1 and c["state"] == "idle":
                break
            time.sleep(0.1)
        node.calls(calls[100:])
        assert node.stop() == 0
    finally:
        node.live.close()
    (snap,) = (backup / "gen-000003").glob("snapshot-v*")
    assert snap.name.endswith(".pbsnap") and snap.read_bytes()[:8] == b"PIBKSNAP"
    assert list((backup / "gen-000002").glob("snapshot-v*.sqlite3"))  # the format 1 generation as it was
    for generation in (None, "2"):
        out = tmp_path / f"restored-{generation}.sqlite3"
        r = restore_to(backup, out, *(["--generation", generation] if generation else []))
        assert r.returncode == 0, r.stdout + r.stderr
        if generation is None:
            assert dbcompare.backup_differences(netdir / "lightningd.sqlite3", out) == []
    v = cli("verify", str(backup))
    assert v.returncode == 0, v.stdout + v.stderr
