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
from helpers import cli, tmpfs


@pytest.fixture
def small_stick(tmp_path: Path):
    """A 160 KiB tmpfs standing in for a nearly full USB stick (needs root)."""
    with tmpfs(tmp_path / "stick", "size=160k") as mnt:
        yield mnt


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
