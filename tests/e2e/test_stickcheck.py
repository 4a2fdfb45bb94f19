"""`pibackup check DIR` and the medium behind a directory: mountinfo and fstab read right, the
report on loop-mounted ext4 and exFAT sticks (root only), and two destinations on one medium
told apart from two media. Sync times are reported, never asserted."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

import driver
from helpers import LoopStick, cli
from pibackup.app import stickcheck

MOUNTINFO = """\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/mmcblk0p2 rw
40 22 8:1 / /mnt/usb rw,noatime shared:20 - ext4 /dev/sda1 rw,errors=remount-ro
41 22 8:17 / /media/pi/MY\\040STICK rw,nosuid,nodev,relatime shared:21 - vfat /dev/sdb1 rw,fmask=0022,dmask=0022
42 40 0:50 / /mnt/usb/inner ro,relatime shared:22 - tmpfs tmpfs ro,size=1024k
"""


def test_mountinfo_gives_the_deepest_mount_and_unescapes_names(tmp_path):
    mi = tmp_path / "mountinfo"
    mi.write_text(MOUNTINFO)
    m = stickcheck.mount_of("/mnt/usb/pibackup", str(mi))
    assert m is not None and (m.point, m.source, m.fstype) == ("/mnt/usb", "/dev/sda1", "ext4")
    assert "noatime" in m.options and "errors=remount-ro" in m.options
    m = stickcheck.mount_of("/media/pi/MY STICK/pibackup", str(mi))
    assert m is not None and m.fstype == "vfat" and m.point == "/media/pi/MY STICK"
    m = stickcheck.mount_of("/mnt/usb/inner/x", str(mi))
    assert m is not None and m.fstype == "tmpfs" and "ro" in m.options
    m = stickcheck.mount_of("/home/bitcoin", str(mi))
    assert m is not None and m.point == "/" and m.source == "/dev/mmcblk0p2"


def test_fstab_line_found_by_its_mount_point(tmp_path):
    fstab = tmp_path / "fstab"
    fstab.write_text(
        "# comment\nPARTUUID=abc-02  /  ext4  defaults,noatime  0  1\n"
        "LABEL=PIBACKUP /mnt/usb/ ext4 nofail,noatime,errors=remount-ro 0 2  # the stick\n"
    )
    assert stickcheck.fstab_options("/mnt/usb", str(fstab)) == ["nofail", "noatime", "errors=remount-ro"]
    assert stickcheck.fstab_options("/media/pi", str(fstab)) is None
    assert stickcheck.fstab_options("/mnt/usb", str(tmp_path / "missing")) is None


def test_sync_latency_leaves_nothing_behind(tmp_path):
    times = stickcheck.sync_latency(str(tmp_path), samples=5)
    assert len(times) == 5 and all(t >= 0 for t in times)
    assert list(tmp_path.iterdir()) == []


def test_check_command_on_a_plain_directory(tmp_path):
    live = tmp_path / "lightningd.sqlite3"
    live.write_bytes(b"")
    r = cli("check", str(tmp_path), "--live-db", str(live), "--json")
    rep = json.loads(r.stdout)
    # The live database is beside it: the same medium, a warning, exit status 1.
    assert rep["medium"] == rep["live_db_medium"], rep
    assert any("same medium" in w for w in rep["warnings"]), rep
    assert r.returncode == 1
    assert set(rep["sync_ms"]) == {"in", "samples", "p50", "p99", "max"} and rep["sync_ms"]["samples"] == stickcheck.SYNC_SAMPLES
    assert rep["sync_ms"]["in"] == str(tmp_path.parent), "measured beside the directory, on the same file system"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lightningd.sqlite3"], "nothing is written into the directory"
    assert not list(tmp_path.parent.glob(".pibackup-check-*")), "the measure's file is removed"
    text = cli("check", str(tmp_path), "--live-db", str(live))
    assert "sync latency:  p50" in text.stdout and "WARNING:" in text.stdout, text.stdout
    missing = cli("check", str(tmp_path / "nope"))
    assert missing.returncode == 1 and "not a directory (is the stick mounted?)" in missing.stderr, missing.stderr


@pytest.fixture
def fstab(tmp_path: Path) -> Path:
    return tmp_path / "fstab"


@pytest.mark.parametrize("fstype", ["ext4", "exfat"])
def test_report_on_a_loop_mounted_stick(fstype, tmp_path, fstab):
    stick = LoopStick(tmp_path / fstype, fstype, size="64M" if fstype == "exfat" else "320M")
    try:
        d = stick.mnt / "pibackup"
        d.mkdir()
        live = tmp_path / "lightningd.sqlite3"  # on the machine's disk, not on the stick
        live.write_bytes(b"")
        fstab.write_text(f"LABEL=PIBACKUP {stick.mnt} {fstype} noatime,errors=remount-ro 0 2\n")
        rep = stickcheck.check(str(d), str(live), samples=8, fstab=str(fstab))
        print(stickcheck.render(rep))
        f = rep.facts
        assert f["mount_point"] == str(stick.mnt)
        assert f["fs_type"] == ("ext4" if fstype == "ext4" else "fuseblk")
        assert str(f["medium"]).startswith("loop") and f["medium"] != f["live_db_medium"]
        assert not any("same medium" in w for w in rep.warnings)
        assert any("has no nofail" in w for w in rep.warnings), rep.warnings
        fat = [w for w in rep.warnings if "FAT32 and exFAT" in w]
        assert bool(fat) == (fstype == "exfat"), rep.warnings
        assert int(f["free_bytes"]) > 0  # type: ignore[call-overload]
        # With nofail, an ext4 stick has nothing to warn about but (perhaps) its speed.
        fstab.write_text(f"LABEL=PIBACKUP {stick.mnt} {fstype} nofail,noatime 0 2\n")
        rep = stickcheck.check(str(d), str(live), samples=8, fstab=str(fstab))
        left = [w for w in rep.warnings if "sync" not in w]
        assert (left == []) == (fstype == "ext4"), left
        # The live database on the stick itself: the same medium.
        on_stick = d / "lightningd.sqlite3"
        on_stick.write_bytes(b"")
        rep = stickcheck.check(str(d), str(on_stick), samples=2, fstab=str(fstab))
        assert any("same medium" in w for w in rep.warnings), rep.warnings
        on_stick.unlink()
        assert sorted(os.listdir(d)) == []
        assert rep.facts["sync_ms"]["in"] == str(stick.mnt)  # type: ignore[index]
        # The stick's root itself: its parent is another file system, so the measure is made in it.
        rep = stickcheck.check(str(stick.mnt), str(live), samples=2, fstab=str(fstab))
        assert rep.facts["sync_ms"]["in"] == str(stick.mnt)  # type: ignore[index]
        assert set(os.listdir(stick.mnt)) - {"lost+found"} == {"pibackup"}
    finally:
        stick.close()


def test_two_btrfs_subvolumes_are_one_medium_for_several_destinations(traces, make_node, tmp_path):
    """Each btrfs subvolume has an st_dev of its own: the same-medium warning must look at
    the device under them."""
    stick = LoopStick(tmp_path / "btrfs", "btrfs")
    try:
        a, b = stick.mnt / "a", stick.mnt / "b"
        for sub in (a, b):
            subprocess.run(["btrfs", "subvolume", "create", str(sub)], check=True, capture_output=True)
        assert os.stat(a).st_dev != os.stat(b).st_dev
        assert stickcheck.medium(str(a)) == stickcheck.medium(str(b))
        node = make_node(pibackup_destination=[str(a), str(b)])
        node.start(driver.first_run(traces["A"])[:9])
        node.stop()
        assert "two pibackup-destination directories are on the same medium" in node.log_text(), node.log_text()
    finally:
        stick.close()


def test_a_stick_and_the_machine_disk_are_two_media(traces, make_node, tmp_path, dest):
    stick = LoopStick(tmp_path / "ext4", "ext4")
    try:
        on_stick = stick.mnt / "pibackup"
        on_stick.mkdir()
        node = make_node(pibackup_destination=[str(dest), str(on_stick)])
        node.start(driver.first_run(traces["A"])[:9])
        node.stop()
        assert "same medium" not in node.log_text(), node.log_text()
    finally:
        stick.close()
