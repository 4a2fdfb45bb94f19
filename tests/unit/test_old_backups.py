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
