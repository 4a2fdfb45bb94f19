"""A growing file in a store that cannot append, through the real rclone and its local
backend, driven directly: base and parts joined back byte for byte, also after an upload
cut short, a transport that restarted, leftovers of another encryption, and many parts
folded into one object."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Tuple

import pytest

from pibackup.copies import rclone as rclone_transport
from pibackup.copies.rclone import RcloneTransport
from pibackup.copies.rclone_parts import group, parse_part, part_name, tag_of
from pibackup.copies.target import RcloneTarget

pytestmark = pytest.mark.skipif(shutil.which("rclone") is None, reason="rclone is not installed (make setup installs it)")
REL = "gen-000001/seg-000001.pbj"


def setup(tmp_path: Path) -> Tuple[RcloneTransport, Path, Path]:
    config = tmp_path / "rclone.conf"
    config.write_text("[disk]\ntype = local\n")
    local, store = tmp_path / "staging", tmp_path / "store"
    (local / "gen-000001").mkdir(parents=True)
    return RcloneTransport(RcloneTarget("disk", str(store)), str(config)), local, store


def grow(local: Path, n: int) -> bytes:
    with open(local / REL, "ab") as f:
        f.write(os.urandom(n))
    return (local / REL).read_bytes()


def fetched(transport: RcloneTransport, tmp_path: Path) -> bytes:
    into = tmp_path / f"fetched-{os.urandom(4).hex()}"
    into.mkdir()
    assert transport.fetch_copy(str(into), 1 << 30, lambda: True)
    assert not (into / rclone_transport.OBJECTS_DIR).exists(), "the objects as fetched are removed after joining"
    return (into / REL).read_bytes()


def parts_in(store: Path) -> list:
    return sorted(p.name for p in (store / "gen-000001").iterdir() if ".part-" in p.name)


def test_a_growing_file_is_its_base_then_one_part_a_round_and_one_object_once_closed(tmp_path):
    transport, local, store = setup(tmp_path)
    data = grow(local, 300)
    transport.send(str(local), [REL], append=False, growing=True)
    assert (store / REL).read_bytes() == data and parts_in(store) == []
    for n in (10, 1, 5000):
        data = grow(local, n)
        transport.send(str(local), [REL], append=True, growing=True)
        assert fetched(transport, tmp_path) == data
    tag = tag_of(data[:128])
    assert parts_in(store) == [f"seg-000001.pbj.part-{tag}-{o:012d}" for o in (300, 310, 311)]
    transport.send(str(local), [REL], append=True, growing=True)  # nothing new: nothing sent
    assert len(parts_in(store)) == 3
    data = grow(local, 7)
    transport.send(str(local), [REL], append=True)  # closed: whole, then its parts go
    assert (store / REL).read_bytes() == data and parts_in(store) == []
    assert fetched(transport, tmp_path) == data


def test_an_upload_cut_short_and_a_restarted_transport_continue_where_the_store_ends(tmp_path):
    transport, local, store = setup(tmp_path)
    grow(local, 200)
    transport.send(str(local), [REL], append=False, growing=True)
    data = grow(local, 1000)
    transport.send(str(local), [REL], append=True, growing=True)
    # The next part's upload died halfway (a server gone mid-transfer leaves this on sftp).
    data = grow(local, 1000)
    cut = store / "gen-000001" / part_name("seg-000001.pbj", tag_of(data[:128]), 1200)
    cut.write_bytes(data[1200:1700])
    again = RcloneTransport(transport.target, transport.config)  # a restart: it knows nothing
    data = grow(local, 3)
    again.send(str(local), [REL], append=True, growing=True)
    assert fetched(again, tmp_path) == data
    assert [parse_part(n)[2] for n in parts_in(store)] == [200, 1200, 1700]  # type: ignore[index]


def test_leftovers_of_another_base_are_never_joined_and_go_when_it_is_sent_again(tmp_path):
    transport, local, store = setup(tmp_path)
    grow(local, 400)
    transport.send(str(local), [REL], append=False, growing=True)
    grow(local, 100)
    transport.send(str(local), [REL], append=True, growing=True)
    # The shipper restarted its encryption: a new file with new first bytes (another TAG).
    (local / REL).write_bytes(os.urandom(400))
    transport.send(str(local), [REL], append=False, growing=True)
    assert parts_in(store) == [], "the old base's parts are removed"
    # A leftover another way (a deletion cut short): at the right offset, of the old TAG.
    stale = store / "gen-000001" / part_name("seg-000001.pbj", "0" * 8, 400)
    stale.write_bytes(b"x" * 50)
    assert fetched(transport, tmp_path) == (local / REL).read_bytes()
    stored = group([(REL, 400), (f"{REL}.part-{'0' * 8}-{400:012d}", 50)])[REL]
    assert stored.length(tag_of((local / REL).read_bytes()[:128])) == 400


def test_many_parts_are_folded_into_one_object(tmp_path, monkeypatch):
    monkeypatch.setattr(rclone_transport, "MAX_PARTS", 3)
    transport, local, store = setup(tmp_path)
    grow(local, 150)
    transport.send(str(local), [REL], append=False, growing=True)
    for _ in range(3):
        grow(local, 20)
        transport.send(str(local), [REL], append=True, growing=True)
    assert len(parts_in(store)) == 3
    data = grow(local, 20)
    transport.send(str(local), [REL], append=True, growing=True)
    assert parts_in(store) == [] and (store / REL).read_bytes() == data
    data = grow(local, 20)
    transport.send(str(local), [REL], append=True, growing=True)
    assert len(parts_in(store)) == 1 and fetched(transport, tmp_path) == data


def test_a_fetch_takes_only_the_layout_and_the_head_record(tmp_path):
    transport, local, store = setup(tmp_path)
    grow(local, 200)
    transport.send(str(local), [REL], append=False, growing=True)
    (store / "HEAD").write_bytes(b"head")
    (store / "notes.txt").write_text("someone else's")
    (store / "gen-000001" / "evil.sh").write_text("#!/bin/sh\n")
    (store / "gen-000001" / "seg-000001.pbj.part-zz-1").write_text("not a part")
    into = tmp_path / "into"
    into.mkdir()
    assert transport.fetch_copy(str(into), 1 << 30, lambda: True)
    got = sorted(str(p.relative_to(into)) for p in into.rglob("*") if p.is_file())
    assert got == ["HEAD", REL], got


def test_whole_files_are_renamed_into_place_and_an_upload_cut_short_is_never_read(tmp_path):
    transport, local, store = setup(tmp_path)
    data = grow(local, 300)
    transport.send(str(local), [REL], append=False)
    incoming = store / rclone_transport.INCOMING
    assert (store / REL).read_bytes() == data
    assert not [p for p in incoming.rglob("*") if p.is_file()], "nothing is left beside the copy"
    # The Pi died while the next whole upload was under way: a short file beside the copy.
    (incoming / "gen-000001").mkdir(parents=True, exist_ok=True)
    (incoming / REL).write_bytes(data[:100])
    (incoming / "HEAD").write_bytes(b"he")
    assert fetched(transport, tmp_path) == data
    listed = transport.list()
    assert listed is not None and [e.name for e in listed] == ["gen-000001"], listed
    data = grow(local, 10)
    transport.send(str(local), [REL], append=False)  # the next round replaces the leftover
    assert (store / REL).read_bytes() == data and not (incoming / REL).exists()

