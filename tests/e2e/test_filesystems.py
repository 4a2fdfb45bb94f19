"""The backup on each file system a USB stick may carry, loop-mounted (root only): ext4, xfs,
btrfs, and exFAT through FUSE, which invents inode numbers as the kernel's FAT and exFAT do."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

import dbcompare
import driver
from driver import Halted
from helpers import LoopStick, cli, drop_caches

FILESYSTEMS = ["ext4", "xfs", "btrfs", "exfat"]
MODES = pytest.mark.parametrize("mode", ["journal", "replica"])
DROP_EVERY = 100  # calls between two drop_caches


@pytest.fixture(params=FILESYSTEMS)
def stick(request, tmp_path: Path):
    s = LoopStick(tmp_path / request.param, request.param)
    yield s
    s.close()


def forgetful(node: driver.Node) -> None:
    """Every DROP_EVERY calls, the kernel forgets what it can of the stick's inodes (as it
    does under memory pressure on a small board)."""
    call, count = node.call, [0]

    def wrapped(r: driver.Record) -> None:
        count[0] += 1
        if count[0] % DROP_EVERY == 0:
            drop_caches()
        call(r)

    node.call = wrapped  # type: ignore[method-assign]


def copy_tree(src: Path, dst: Path) -> None:
    """Files and directories only: FAT and exFAT keep no owners or modes to copy."""
    for dirpath, _, files in os.walk(src):
        target = dst / Path(dirpath).relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copyfile(Path(dirpath) / f, target / f)


def test_exfat_invents_inode_numbers_but_keeps_those_of_what_is_held_open(tmp_path):
    """What makes the replay below on exFAT mean something: a directory nobody holds gets
    another inode number once the kernel has forgotten it; one with a file open inside keeps
    its number, as the backup directory does under the writer's open lock directory."""
    stick = LoopStick(tmp_path / "exfat", "exfat", size="64M")
    try:
        free, held = stick.mnt / "free", stick.mnt / "held"
        free.mkdir()
        held.mkdir()
        (held / "lock").mkdir()
        before = {d: os.stat(d).st_ino for d in (free, held)}
        fd = os.open(held / "lock", os.O_RDONLY | os.O_DIRECTORY)
        try:
            for _ in range(20):  # the FUSE process takes the kernel's "forget" in its own time
                drop_caches()
                time.sleep(0.1)
                after = {d: os.stat(d).st_ino for d in (free, held)}
                assert after[held] == before[held]
                if after[free] != before[free]:
                    break
        finally:
            os.close(fd)
        assert after[free] != before[free], "exfat-fuse kept the number of a forgotten directory: the replay proves less"
    finally:
        stick.close()


@MODES
def test_replay_on_each_file_system_restores_the_live_database(stick, mode, traces, make_node, tmp_path):
    dest = stick.mnt / "pibackup"
    dest.mkdir()
    node = make_node(pibackup_destination=str(dest), pibackup_mode=mode)
    forgetful(node)
    driver.run_sessions(node, traces["A"])
    assert node.live.version() == traces["A"][-1].data_version
    log = node.log_text()
    assert "error" not in [lvl for lvl, _ in node.all_logs], log
    assert "replaced" not in log and "vanished" not in log, log
    out = tmp_path / "restored.sqlite3"
    r = cli("restore", str(dest), str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert dbcompare.backup_differences(node.live.path, out) == []
    assert cli("verify", str(dest)).returncode == 0


@MODES
def test_another_stick_mounted_at_the_same_path_is_noticed(stick, mode, traces, make_node, tmp_path):
    """The stick is pulled and another one, of the same file system and holding a copy of the
    same backup, is mounted at the same path: the next write is refused, not written into the
    pulled stick's detached file system."""
    dest = stick.mnt / "pibackup"
    dest.mkdir()
    recs = driver.first_run(traces["A"])
    node = make_node(pibackup_destination=str(dest), pibackup_mode=mode)
    node.start(recs[:9])
    node.calls(recs[9:100])
    copy = tmp_path / "copy"
    copy_tree(dest, copy)
    stick.unplug()
    other = LoopStick(tmp_path / "other", stick.fstype, mnt=stick.mnt)
    try:
        copy_tree(copy, dest)
        before = node.live.version()
        with pytest.raises(Halted):
            node.call(recs[100])
        assert node.live.version() == before, "a write into the pulled stick must not be acknowledged"
        assert "another file system is mounted at the backup directory now" in node.log_text(), node.log_text()
    finally:
        if node.plugin is not None:
            node.plugin.proc.kill()
            node.plugin.proc.wait()
        other.close()


def fuse_daemon(device: str) -> int:
    """The pid of the exfat-fuse process serving `device` (one this test started)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"mount.exfat-fuse") and device.encode() in args:
            return int(pid)
    raise AssertionError(f"no mount.exfat-fuse process for {device}")


def test_an_exfat_stick_whose_fuse_process_died_halts_the_node_with_what_to_do(traces, make_node, tmp_path):
    stick = LoopStick(tmp_path / "exfat", "exfat")
    try:
        dest = stick.mnt / "pibackup"
        dest.mkdir()
        recs = driver.first_run(traces["A"])
        node = make_node(pibackup_destination=str(dest))
        node.start(recs[:9])
        node.calls(recs[9:60])
        os.kill(fuse_daemon(stick.loop), 9)
        # A bulk transaction may still be answered from memory (tiers); the first that must be
        # synced is refused.
        with pytest.raises(Halted):
            for r in recs[60:80]:
                node.call(r)
        assert "the stick's FUSE file system process is gone" in node.log_text(), node.log_text()
    finally:
        stick.close()
