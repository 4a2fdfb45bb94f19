"""The restore and verify command line on good, damaged and foreign backups."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

import dbcompare
import driver
from helpers import cli, segments
from pibackup.store.reader import scan_segment
from pibackup.store.segment import KIND_TX


@pytest.fixture(scope="module")
def backup(tmp_path_factory, traces):
    """A backup of the whole of trace A (several segments, one generation: automatic
    compaction off), and the live DB it came from."""
    root = tmp_path_factory.mktemp("backup")
    dest = root / "usb"
    dest.mkdir()
    opts = {"pibackup-destination": str(dest), "pibackup-segment-size": "128K", "pibackup-compact-ratio": "0"}
    node = driver.Node(root, opts)
    driver.run_sessions(node, traces["A"])
    node.live.close()
    assert len(segments(dest)) >= 3
    return dest, node.live.path


@pytest.fixture
def copy(backup, tmp_path):
    dest, live = backup
    d = tmp_path / "copy"
    shutil.copytree(dest, d)
    return d, live


def version_of(db: Path) -> int:
    return sqlite3.connect(db).execute("SELECT intval FROM vars WHERE name='data_version'").fetchone()[0]


def test_restore_refuses_to_overwrite_without_force(copy, tmp_path):
    d, live = copy
    out = tmp_path / "lightningd.sqlite3"
    out.write_bytes(b"precious")
    r = cli("restore", str(d), str(out))
    assert r.returncode == 1 and "already exists" in r.stderr and "--force" in r.stderr
    assert out.read_bytes() == b"precious"
    r = cli("restore", str(d), str(out), "--force")
    assert r.returncode == 0, r.stderr
    assert dbcompare.backup_differences(live, out) == []
    assert not list(tmp_path.glob("*.pibackup-tmp*"))


def test_corruption_in_the_middle_names_file_and_offset_and_writes_nothing(copy, tmp_path):
    d, _ = copy
    seg = segments(d)[1]
    data = bytearray(seg.read_bytes())
    data[5000] ^= 0x40
    seg.write_bytes(bytes(data))
    out = tmp_path / "out.sqlite3"
    r = cli("restore", str(d), str(out))
    assert r.returncode == 1
    assert str(seg) in r.stderr and "offset" in r.stderr, r.stderr
    assert not out.exists() and not list(tmp_path.glob("*.pibackup-tmp*"))
    v = cli("verify", str(d))
    assert v.returncode == 1 and "DAMAGED" in v.stdout and str(seg) in v.stdout


def test_partial_restore_stops_at_the_last_good_transaction_and_says_so(copy, tmp_path):
    d, _ = copy
    seg = segments(d)[-1]
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 0x01  # the middle of the last segment: valid frames follow
    seg.write_bytes(bytes(data))
    out = tmp_path / "out.sqlite3"
    r = cli("restore", str(d), str(out), "--partial")
    assert r.returncode == 1 and "WARNING" in r.stderr and "restored only up to data_version" in r.stderr
    reported = int(r.stderr.split("restored only up to data_version ")[1].split()[0])
    assert version_of(out) == reported
    assert sqlite3.connect(out).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_torn_tail_is_reported_and_everything_before_it_restored(copy, tmp_path):
    d, live = copy
    seg = segments(d)[-1]
    data = seg.read_bytes()
    last_tx = [f for f in scan_segment(str(seg)).frames if f.kind == KIND_TX][-1]
    seg.write_bytes(data[: last_tx.offset + 30])  # the last transaction lost its end in a power cut
    out = tmp_path / "out.sqlite3"
    r = cli("restore", str(d), str(out))
    assert r.returncode == 0, r.stderr
    assert "unfinished append" in r.stderr
    assert version_of(out) == version_of(live) - 1


def test_missing_segment_is_reported(copy, tmp_path):
    d, _ = copy
    segments(d)[1].unlink()
    r = cli("restore", str(d), str(tmp_path / "o.sqlite3"))
    assert r.returncode == 1 and "a segment is missing" in r.stderr, r.stderr


def test_damaged_snapshot_is_reported(traces, tmp_path):
    dest = tmp_path / "usb"
    dest.mkdir()
    node = driver.Node(tmp_path, {"pibackup-destination": str(dest)})
    recs = traces["A"]
    for r in recs[:100]:
        node.commit_without_plugin(r)
    node.start(recs[100:102])
    node.stop()
    snap = next(dest.glob("gen-*/snapshot-*"))
    data = bytearray(snap.read_bytes())
    data[len(data) // 2] ^= 1
    snap.write_bytes(bytes(data))
    r = cli("restore", str(dest), str(tmp_path / "o.sqlite3"))
    assert r.returncode == 1 and "snapshot is damaged" in r.stderr and str(snap) in r.stderr
    assert cli("verify", str(dest)).returncode == 1


def test_a_directory_that_is_not_a_backup_is_refused(tmp_path):
    (tmp_path / "x").mkdir()
    r = cli("restore", str(tmp_path / "x"), str(tmp_path / "o.sqlite3"))
    assert r.returncode == 1 and "is not a pibackup backup" in r.stderr
    r = cli("verify", str(tmp_path / "nope"))
    assert r.returncode == 1 and "is not a directory" in r.stderr


def test_verify_lists_generations_and_ranges(copy):
    d, live = copy
    v = cli("verify", str(d))
    assert v.returncode == 0
    assert f"gen-000001: empty database, journal to data_version {version_of(live)}" in v.stdout
    assert v.stdout.strip().endswith("ok")


def test_help_is_there_for_each_command():
    for args in (["--help"], ["restore", "--help"], ["verify", "--help"]):
        r = cli(*args)
        assert r.returncode == 0 and "usage: pibackup" in r.stdout
    r = cli("restore")
    assert r.returncode == 2


def test_partial_restore_after_damage_in_a_middle_segment_keeps_every_frame_before_it(copy, tmp_path):
    d, _ = copy
    seg = segments(d)[1]
    frames = [f for f in scan_segment(str(seg)).frames if f.kind == KIND_TX]
    victim = frames[len(frames) // 2]
    data = bytearray(seg.read_bytes())
    data[victim.offset + 40] ^= 0x04
    seg.write_bytes(bytes(data))
    out = tmp_path / "out.sqlite3"
    r = cli("restore", str(d), str(out), "--partial")
    assert r.returncode == 1 and f"offset {victim.offset}" in r.stderr, r.stderr
    assert version_of(out) == victim.data_version - 1


def test_restore_into_an_impossible_place_is_a_clear_error(copy, tmp_path):
    d, _ = copy
    r = cli("restore", str(d), "/proc/version/x.sqlite3")
    assert r.returncode == 1 and "Traceback" not in r.stderr and "pibackup: error:" in r.stderr


def test_force_is_refused_while_lightningd_runs_on_the_backup(traces, make_node, dest, tmp_path):
    node = make_node()
    node.start(traces["A"][:9])
    existing = tmp_path / "lightningd.sqlite3"
    existing.write_bytes(b"x")
    r = cli("restore", str(dest), str(existing), "--force")
    assert r.returncode == 1 and "stop lightningd" in r.stderr
    assert existing.read_bytes() == b"x"
    assert cli("restore", str(dest), str(tmp_path / "new.sqlite3")).returncode == 0  # a new file is fine
    node.stop()


def test_restore_reports_progress_to_a_person_and_stays_quiet_in_scripts(copy, tmp_path):
    from pibackup.modes.journal.restore import restore

    d, live = copy
    seen = []
    out = restore(str(d), str(tmp_path / "p.sqlite3"), progress=lambda o, f, r: seen.append((f, o.transactions)), progress_interval=0)
    assert len(seen) > 100 and all(0 <= f <= 1 for f, _ in seen)
    assert [f for f, _ in seen] == sorted(f for f, _ in seen) and seen[-1][1] <= out.transactions
    r = cli("restore", str(d), str(tmp_path / "q.sqlite3"))  # stderr is a pipe here, not a terminal
    assert r.returncode == 0 and "restoring" not in r.stderr


def test_a_generation_that_holds_no_transaction_yet_restores_to_an_empty_database(traces, make_node, dest, tmp_path):
    """A power cut right after a fresh node's first generation was made, before the frames of
    the calls answered before init reached the stick (crash-state exploration found it): a
    legitimate state that holds nothing acknowledged. restore must say so, not fail inside SQLite."""
    node = make_node()
    node.start(traces["A"][:9])
    node.stop()
    seg = segments(dest)[0]
    info = scan_segment(str(seg)).frames[0]
    assert info.kind != KIND_TX
    with open(seg, "r+b") as f:
        f.truncate(_frame_end(seg, info.offset))  # the INFO frame stays, every transaction frame is gone
    out = tmp_path / "restored.sqlite3"
    r = cli("restore", str(dest), str(out))
    assert r.returncode == 0, r.stderr
    assert "0 transactions replayed" in r.stdout + r.stderr
    conn = sqlite3.connect(out)
    assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
    conn.close()


def _frame_end(seg: Path, offset: int) -> int:
    """Where the frame at `offset` ends (its header holds its payload length)."""
    data = seg.read_bytes()
    return offset + 16 + int.from_bytes(data[offset + 8 : offset + 12], "big")
