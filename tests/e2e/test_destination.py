"""Bad destinations and a missing live DB: one actionable log line, lightningd halted the
documented way (its next db_write refused, nothing committed), never a traceback or a kill."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from driver import Halted
from helpers import tmpfs


def _expect_refusal(node, traces, fragment: str) -> None:
    recs = traces["A"]
    node.start(recs[:9])  # pre-init calls are answered; init then finds the problem
    errors = [m for lvl, m in node.plugin.logs if lvl == "error"]
    assert len(errors) == 1, node.plugin.log_text()
    assert fragment in errors[0], errors[0]
    assert "Traceback" not in node.plugin.log_text()
    before = node.live.version()
    with pytest.raises(Halted):
        node.call(recs[9])
    assert node.live.version() == before, "a refused transaction must not be committed"


@pytest.mark.parametrize(
    "value, fragment",
    [
        (None, "pibackup-destination is not set"),
        ("", "pibackup-destination is not set"),
        ("usb/pibackup", "is a relative path"),
        ("/nonexistent/usb/pibackup", "does not exist: is the USB stick mounted?"),
    ],
)
def test_bad_destination_value_halts_with_an_actionable_message(value, fragment, make_node, traces):
    node = make_node()
    if value is None:
        del node.options["pibackup-destination"]
    else:
        node.options["pibackup-destination"] = value
    _expect_refusal(node, traces, fragment)


def test_destination_that_is_a_file_is_refused(make_node, traces, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    node = make_node(pibackup_destination=str(f))
    _expect_refusal(node, traces, "is not a directory")


def test_destination_with_foreign_files_is_refused_and_left_alone(make_node, traces, dest):
    (dest / "holiday-photos.jpg").write_bytes(b"\xff\xd8")
    node = make_node()
    _expect_refusal(node, traces, "holds files that are not pibackup's (holiday-photos.jpg)")
    assert sorted(os.listdir(dest)) == ["holiday-photos.jpg"]


def test_destination_from_a_newer_pibackup_is_refused(make_node, traces, dest):
    (dest / "PIBACKUP").write_text("pibackup backup directory\nformat 7\n")
    node = make_node()
    _expect_refusal(node, traces, "format 7")


def test_filesystem_root_artifacts_are_tolerated(make_node, traces, dest, tmp_path):
    (dest / "lost+found").mkdir()
    node = make_node()
    node.start(traces["A"][:9])
    node.stop()
    assert (dest / "PIBACKUP").exists()


@pytest.fixture
def readonly_mount(tmp_path: Path):
    with tmpfs(tmp_path / "ro", "size=1m,ro") as mnt:
        yield mnt


def test_read_only_destination_is_refused(make_node, traces, readonly_mount):
    node = make_node(pibackup_destination=str(readonly_mount))
    _expect_refusal(node, traces, "remount it read-write or replace the stick")


def test_two_nodes_on_one_destination_are_refused(make_node, traces, dest):
    a = make_node()
    a.start(traces["A"][:9])
    b = make_node()
    _expect_refusal(b, traces, "is being written by another pibackup")
    a.stop()


def test_missing_live_database_is_refused(make_node, traces, tmp_path):
    node = make_node(pibackup_live_db=str(tmp_path / "nowhere.sqlite3"))
    _expect_refusal(node, traces, "not found; if it lives elsewhere, set pibackup-live-db")


def test_postgres_wallet_is_refused_clearly(make_node, traces):
    node = make_node()
    (node.lightning_dir / "config").write_text("network=regtest\nwallet=postgres://user:pass@localhost/cln\n")
    _expect_refusal(node, traces, "PostgreSQL wallet")


def test_wallet_setting_in_lightningd_config_is_followed(make_node, traces, dest, tmp_path):
    node = make_node()
    # lightningd's database lives somewhere else and the config file says so.
    moved = tmp_path / "ssd" / "cln.sqlite3"
    moved.parent.mkdir()
    node.live.close()
    node.live.path.rename(moved)
    import driver

    node.live = driver.LiveDB(moved)
    (node.lightning_dir / "config").write_text(f"network=regtest\nwallet=sqlite3://{moved}:/media/usb/x.sqlite3\n")
    recs = traces["A"]
    for r in recs[:50]:
        node.commit_without_plugin(r)
    node.start(recs[50:52])
    node.stop()
    snaps = list(dest.glob("gen-000001/snapshot-v*"))
    assert [s.name for s in snaps] == [f"snapshot-v{recs[51].data_version}.pbsnap"]
