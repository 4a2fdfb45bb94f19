"""The names of a backup directory are pinned: a second reader (docs/FORMAT.md) relies on them."""

from __future__ import annotations

import re
from pathlib import Path

from pibackup.store import layout

FORMAT = (Path(__file__).resolve().parents[2] / "docs" / "FORMAT.md").read_text()


def test_names_are_the_ones_format_md_gives() -> None:
    assert layout.MARKER == "PIBACKUP"
    assert layout.LOCK_DIR == "PIBACKUP.lock"
    assert layout.generation_dirname(1) == "gen-000001"
    assert layout.segment_filename(2) == "seg-000002.pbj"
    assert layout.snapshot_filename(842) == "snapshot-v842.pbsnap"
    assert layout.plain_snapshot_filename(842) == "snapshot-v842.sqlite3"  # format 1's, still read
    assert layout.snapshot_version("gen-000002/snapshot-v842.pbsnap") == 842 == layout.snapshot_version("snapshot-v842.sqlite3")
    assert layout.replica_dirname(1) == "replica-000001"
    assert layout.REPLICA_FILE == "replica.sqlite3"
    assert layout.DAMAGE_MARK == "DAMAGED"
    assert (layout.PARTIAL_SUFFIX, layout.DELETED_SUFFIX, layout.DAMAGED_SUFFIX) == (".partial", ".deleted", ".damaged")
    assert (layout.STAGING_DIR, layout.STATE_FILE, layout.COPY_ID_FILE, layout.HEAD) == (".ship", "state.json", "copy-id", "HEAD")
    assert layout.RESTORE_TMP_SUFFIX == ".pibackup-tmp"
    assert layout.TMP_SUFFIX == ".tmp"


def test_every_name_of_the_directory_tree_is_in_format_md() -> None:
    tree = FORMAT[FORMAT.index("## Directory tree") :]
    tree = tree[: tree.index("```", tree.index("```") + 3)]
    for name in (
        layout.MARKER,
        layout.LOCK_DIR + "/",
        layout.generation_dirname(1) + "/",
        layout.segment_filename(1),
        layout.snapshot_filename(842),
        layout.generation_dirname(3) + layout.PARTIAL_SUFFIX + "/",
        "gen-NNNNNN" + layout.DELETED_SUFFIX + "/",
        layout.STAGING_DIR + "/",
        layout.COPY_ID_FILE,
        layout.STATE_FILE,
        layout.HEAD,
    ):
        assert re.search(r"(^|\s)" + re.escape(name) + r"\s", tree), name
    for name in (layout.replica_dirname(1) + "/", layout.REPLICA_FILE, "replica-000001" + layout.DAMAGED_SUFFIX + "/"):
        assert name in FORMAT, name
    for name in layout.FS_ARTIFACTS & {"lost+found", "System Volume Information"}:
        assert name in FORMAT


def test_generation_names() -> None:
    assert layout.is_generation_name("gen-000001")
    assert layout.generation_number("gen-000012") == 12
    for name in ("gen-1", "gen-000001.partial", "gen-000001.deleted", "gen-0000001", "replica-000001"):
        assert not layout.is_generation_name(name)
        assert layout.generation_number(name) is None
    assert layout.PARTIAL_GENERATION_RE.match("gen-000002.partial")
    assert layout.DELETED_GENERATION_RE.match("gen-000002.deleted")


def test_layout_paths_are_the_backup_files_only() -> None:
    for rel in ("PIBACKUP", "gen-000001/seg-000001.pbj", "gen-000002/snapshot-v842.sqlite3", "gen-000002/snapshot-v842.pbsnap"):
        assert layout.is_layout_path(rel), rel
    for rel in (
        "HEAD",  # checked apart
        "PIBACKUP.lock",
        "gen-000001",
        "gen-000001/seg-000001.pbj.tmp",
        "gen-000001/../PIBACKUP",
        "gen-000001.partial/seg-000001.pbj",
        "gen-000001/x/seg-000001.pbj",
        "gen-000001/DAMAGED",
        ".ship/state.json",
        "gen-000001/*",
    ):
        assert not layout.is_layout_path(rel), rel


def test_replica_dirs_and_what_a_directory_holds(tmp_path: Path) -> None:
    assert not layout.holds_replica(str(tmp_path)) and not layout.holds_journal(str(tmp_path))
    (tmp_path / "replica-000002").mkdir()
    (tmp_path / "replica-000002" / layout.REPLICA_FILE).write_bytes(b"")
    (tmp_path / "replica-000001").mkdir()  # no replica file: not complete
    (tmp_path / "replica-000003.partial").mkdir()
    (tmp_path / "replica-000004.damaged").mkdir()
    assert layout.replica_dirs(str(tmp_path)) == [(2, str(tmp_path / "replica-000002"))]
    assert layout.holds_replica(str(tmp_path))
    assert layout.REPLICA_LEFTOVER_RE.match("replica-000003.partial") and not layout.REPLICA_LEFTOVER_RE.match(
        "replica-000004.damaged"
    )
    assert layout.REPLICA_ANY_RE.match("replica-000004.damaged2")
    (tmp_path / "gen-000001.partial").mkdir()
    assert layout.holds_journal(str(tmp_path))
    assert not layout.holds_replica(str(tmp_path / "missing"))
