"""The backup medium failing under a running node: a clear error, the node halted before
anything unbacked is committed, nothing acknowledged lost, and a clean resume afterwards."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import dbcompare
import driver
from driver import Halted
from helpers import Ext4Stick, assert_nothing_acknowledged_lost, cli, tmpfs


@pytest.fixture(params=["tmpfs", "ext4"])
def small_stick(request, tmp_path: Path):
    """A nearly full USB stick (needs root): a 160 KiB tmpfs, or a loop-mounted ext4 image
    with about 217 KiB free."""
    if request.param == "tmpfs":
        with tmpfs(tmp_path / "stick", "size=160k") as mnt:
            yield mnt
        return
    s = Ext4Stick(tmp_path / "ext4", "256K", ["-b", "1024", "-O", "^has_journal,^resize_inode", "-N", "24"])
    yield s.mnt
    s.close()


def test_full_medium_halts_the_node_and_loses_nothing(small_stick, traces, make_node, tmp_path):
    dest = small_stick / "pibackup"
    dest.mkdir()
    recs = driver.first_run(traces["A"])
    node = make_node(pibackup_destination=str(dest), pibackup_preallocate_kb=16)
    node.start(recs[:9])
    halted_at = None
    for i, r in enumerate(recs[9:], start=9):
        try:
            node.call(r)
        except Halted:
            halted_at = i
            break
    assert halted_at is not None, "a 160 KiB stick should fill up"
    log = node.log_text()
    assert "the backup medium is full; free space on it or replace it" in log, log
    # Everything lightningd committed is in the backup.
    out = tmp_path / "restored.sqlite3"
    r = cli("restore", str(dest), str(out))
    assert r.returncode == 0, r.stderr
    assert dbcompare.backup_differences(node.live.path, out) == []
    # The owner moves the backup to a bigger stick; the node starts again and goes on.
    bigger = tmp_path / "bigger"
    shutil.copytree(dest, bigger)
    node.options["pibackup-destination"] = str(bigger)
    node.start([recs[halted_at], recs[halted_at + 1]])
    node.calls(recs[halted_at + 2 : halted_at + 40])
    node.stop()
    out2 = tmp_path / "restored2.sqlite3"
    assert cli("restore", str(bigger), str(out2)).returncode == 0
    assert dbcompare.backup_differences(node.live.path, out2) == []


def test_backup_directory_deleted_under_the_plugin_halts_the_node(traces, make_node, dest):
    recs = driver.first_run(traces["A"])
    node = make_node()
    node.start(recs[:9])
    node.calls(recs[9:50])
    before = node.live.version()
    shutil.rmtree(dest)
    with pytest.raises(Halted):
        node.call(recs[50])
    assert node.live.version() == before
    assert "the backup directory vanished" in node.log_text()


def test_a_refused_transaction_never_reaches_the_stick_even_if_it_recovers(small_stick, traces, make_node, tmp_path):
    """The stick is full, a call is refused (lightningd never commits it), then space comes
    back before lightningd closes the pipe: the refused frame must not be written at exit."""
    dest = small_stick / "pibackup"
    dest.mkdir()
    filler = small_stick / "filler"
    recs = driver.first_run(traces["A"])
    node = make_node(pibackup_destination=str(dest), pibackup_preallocate_kb=16)
    node.start(recs[:9])
    i = 9
    while True:
        if not filler.exists():
            free = os.statvfs(small_stick).f_bavail * os.statvfs(small_stick).f_frsize
            filler.write_bytes(b"x" * max(0, free - 24 * 1024))  # leave room for a few appends only
        r = recs[i]
        resp = node.plugin.request("db_write", {"data_version": r.data_version, "writes": list(r.writes)})
        if resp.get("result") != {"result": "continue"}:
            break
        node.live.commit(r.writes)
        i += 1
    filler.unlink()  # space again, before lightningd's stdin closes
    node.halt()
    out = tmp_path / "restored.sqlite3"
    assert cli("restore", str(dest), str(out)).returncode == 0
    assert dbcompare.backup_differences(node.live.path, out) == []


@pytest.fixture
def stick(tmp_path: Path):
    s = Ext4Stick(tmp_path / "ext4", "16M")
    yield s
    s.close()


def resume_on_fixed_medium(node: driver.Node, recs, i: int, dest: Path, tmp_path: Path) -> None:
    """lightningd starts again (its halted transaction comes again first) and goes on; the
    restore equals what it committed."""
    node.start([recs[i], recs[i + 1]])
    node.calls(recs[i + 2 : i + 60])
    node.stop()
    out = tmp_path / "after-fix.sqlite3"
    r = cli("restore", str(dest), str(out))
    assert r.returncode == 0, r.stderr
    assert dbcompare.backup_differences(node.live.path, out) == []


def run_until_halted(node: driver.Node, recs, start: int, fault, fault_at: int) -> int:
    for i in range(start, len(recs)):
        if i == fault_at:
            fault()
        try:
            node.call(recs[i])
        except Halted:
            return i
    raise AssertionError("the node was never halted")


MODES = pytest.mark.parametrize("mode", ["journal", "replica"])
# What each mode says (the replica's come from SQLite's error codes).
READ_ONLY = {
    "journal": "the backup medium is read-only (the kernel may have remounted it after errors)",
    "replica": "(the medium may be read-only, failing or unplugged; check it or replace it)",
}
EIO = {
    "journal": "I/O error on the backup medium: the stick or card may be failing or was unplugged; replace it",
    "replica": "(the medium may be read-only, failing or unplugged; check it or replace it)",
}


@MODES
def test_stick_turned_read_only_by_the_kernel_halts_then_resumes(mode, stick, traces, make_node, tmp_path):
    dest = stick.mnt / "pibackup"
    dest.mkdir()
    recs = driver.first_run(traces["A"])
    node = make_node(pibackup_destination=str(dest), pibackup_mode=mode)
    node.start(recs[:9])
    before = None

    def fault() -> None:
        nonlocal before
        before = node.live.version()
        stick.kernel_error()

    i = run_until_halted(node, recs, 9, fault, 120)
    assert node.live.version() == before, "the refused transaction was not committed"
    assert READ_ONLY[mode] in node.log_text(), node.log_text()
    assert_nothing_acknowledged_lost(dest, node, tmp_path, "readonly", recs[i])
    stick.repair()
    resume_on_fixed_medium(node, recs, i, dest, tmp_path)


@MODES
def test_stick_unplugged_mid_run_halts_then_resumes_when_plugged_back(mode, stick, traces, make_node, tmp_path):
    dest = stick.mnt / "pibackup"
    dest.mkdir()
    recs = driver.first_run(traces["A"])
    node = make_node(pibackup_destination=str(dest), pibackup_mode=mode)
    node.start(recs[:9])
    before = None

    def fault() -> None:
        nonlocal before
        before = node.live.version()
        stick.unplug()

    i = run_until_halted(node, recs, 9, fault, 120)
    assert node.live.version() == before, "a write to an unplugged stick must not be acknowledged"
    assert "the backup directory vanished: was the USB stick unplugged?" in node.log_text()
    assert not dest.exists()
    stick.mount()  # plugged back in (the halted plugin has let go of the old mount)
    assert_nothing_acknowledged_lost(dest, node, tmp_path, "unplugged", recs[i])
    resume_on_fixed_medium(node, recs, i, dest, tmp_path)


@MODES
@pytest.mark.parametrize("syscall", ["fdatasync", "pwrite64"])
def test_io_errors_halt_the_node_and_lose_nothing(syscall, mode, stick, traces, make_node, tmp_path):
    """EIO from the kernel on the Nth sync or write (injected by strace: this kernel has no
    device-mapper for dm-error/dm-flakey)."""
    if not shutil.which("strace"):
        pytest.skip("strace is not installed (make setup installs it)")
    dest = stick.mnt / "pibackup"
    dest.mkdir()
    recs = driver.first_run(traces["A"])
    node = make_node(pibackup_destination=str(dest), pibackup_mode=mode)
    # Late enough to come after the start (calls answered before init are the live DB's
    # until the start has written them: hook.py); SQLite writes far more pages than the journal.
    when = 60 if mode == "journal" or syscall == "fdatasync" else 400
    inject = f"inject={syscall}:error=EIO:when={when}"
    node.plugin_prefix = ["strace", "-f", "-qq", "-o", "/dev/null", "-e", f"trace={syscall}", "-e", inject]
    node.start(recs[:9])
    i = run_until_halted(node, recs, 9, lambda: None, -1)
    assert EIO[mode] in node.log_text(), node.log_text()
    assert "backing up" in node.log_text() and i > 9, "the fault came after the start"
    assert_nothing_acknowledged_lost(dest, node, tmp_path, "eio", recs[i])
    node.plugin_prefix = ()
    resume_on_fixed_medium(node, recs, i, dest, tmp_path)


def test_a_segment_that_cannot_be_started_refuses_nothing_and_the_roll_over_is_retried(traces, make_node, dest, tmp_path):
    """The next segment cannot be created (here: a directory sits where its temporary file
    goes). The frame that filled the current segment is durable, so its call is answered
    `continue`; the writer goes on past the segment size and starts the next segment once
    it can."""
    recs = driver.first_run(traces["A"])
    node = make_node(pibackup_segment_size="64K", pibackup_compact_ratio="0", pibackup_batch_seconds=0)
    node.start(recs[:9])
    blocker = dest / "gen-000001" / "seg-000002.pbj.tmp"
    blocker.mkdir()
    seg1 = dest / "gen-000001" / "seg-000001.pbj"
    i = 9
    while seg1.stat().st_size <= 80 * 1024:  # well past the segment size: every flush retried
        node.call(recs[i])  # raises Halted if refused
        i += 1
    assert not (dest / "gen-000001" / "seg-000002.pbj").exists()
    log = node.log_text()
    assert log.count("could not start the next journal segment") == 1, log
    assert any("cannot start a new journal segment" in w for w in node.rpc("pibackup-status")["warnings"])
    out = tmp_path / "while-blocked.sqlite3"
    assert cli("restore", str(dest), str(out)).returncode == 0
    assert dbcompare.backup_differences(node.live.path, out) == []
    blocker.rmdir()
    node.calls(recs[i : i + 20])
    assert (dest / "gen-000001" / "seg-000002.pbj").exists()
    assert node.rpc("pibackup-status")["warnings"] == []
    node.calls(recs[i + 20 :])
    node.stop()
    v = cli("verify", str(dest))
    assert v.returncode == 0, v.stdout + v.stderr
    out2 = tmp_path / "after.sqlite3"
    assert cli("restore", str(dest), str(out2)).returncode == 0
    assert dbcompare.backup_differences(node.live.path, out2) == []


def test_a_new_segment_that_cannot_be_removed_again_halts_the_node_and_loses_nothing(traces, make_node, dest, tmp_path):
    """Every directory sync fails from some point on (a failing card): at the next roll-over
    the new segment is renamed in place, but neither its creation nor its removal can be
    made durable. After a power cut it may be there, claiming to continue the current
    segment, so the current segment must not grow again: the backup fails."""
    recs = driver.first_run(traces["A"])
    fault = tmp_path / "fault"
    node = make_node(pibackup_segment_size="64K", pibackup_compact_ratio="0", pibackup_batch_seconds=0)
    node.plugin_env = {"PIBACKUP_TEST_FAULT": str(fault)}
    node.start(recs[:9])
    seg1 = dest / "gen-000001" / "seg-000001.pbj"
    before = None

    def fail_dir_syncs() -> None:
        nonlocal before
        before = seg1.stat().st_size
        fault.write_text("dirsync")

    i = run_until_halted(node, recs, 9, fail_dir_syncs, 20)
    assert EIO["journal"] in node.log_text(), node.log_text()
    assert seg1.stat().st_size >= 64 * 1024 > before  # halted at the roll-over
    assert not (dest / "gen-000001" / "seg-000002.pbj").exists()
    fault.unlink()
    assert_nothing_acknowledged_lost(dest, node, tmp_path, "left-behind", recs[i])
    resume_on_fixed_medium(node, recs, i, dest, tmp_path)
