"""One suite every backup mode must pass (as restic runs one suite over every backend): the
Writer protocol's promises, driven in-process through the mode registry.

The workload is a small synthetic lightningd: a vars table with data_version, a channels
table, one SQLite transaction per call, the call written to the backup before the live
database commits it (lightningd's db_write hook order). No recordings needed.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path
from typing import List, Optional, Tuple

import pytest

from pibackup.app.config import parse_options
from pibackup.app.modes import MODES, RestoreArgs, detect
from pibackup.errors import PibackupError
from pibackup.modes.api import BehindError, Call, CompactAnswer, Writer

SCHEMA = [
    "CREATE TABLE vars (name VARCHAR(32), val VARCHAR(255), intval INTEGER, blobval BLOB, PRIMARY KEY (name))",
    "INSERT INTO vars (name, intval) VALUES ('data_version', 0)",
    "CREATE TABLE channels (id INTEGER PRIMARY KEY, state INTEGER NOT NULL, note TEXT)",
    # What the default pibackup-filter-tables leaves out, and where a restore looks for the rescan height.
    "CREATE TABLE blocks (height INT PRIMARY KEY, hash BLOB)",
    "CREATE TABLE utxoset (txid BLOB, outnum INT, blockheight INT REFERENCES blocks(height) ON DELETE CASCADE)",
]
STATUS_KEYS = {"destinations", "destination", "live_db", "generation", "data_version", "filter_tables", "counters", "compaction"}


class Lightningd:
    """The live database and the calls lightningd makes for it."""

    def __init__(self, path: Path):
        self.path = path
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("PRAGMA foreign_keys = ON")
        self.version = 0

    def call(self, *statements: str) -> Call:
        """The next transaction's call (not committed yet)."""
        v = self.version + 1
        return Call(v, [*statements, f"UPDATE vars SET intval = {v} WHERE name = 'data_version'"])

    def commit(self, c: Call) -> None:
        if all(w.startswith("PRAGMA") for w in c.writes):
            for w in c.writes:
                self.conn.execute(w)
            return
        self.conn.execute("BEGIN")
        for w in c.writes:
            self.conn.execute(w)
        self.conn.execute("COMMIT")
        self.version = c.data_version

    def send(self, w: Writer, *statements: str) -> Call:
        """A call as lightningd makes it: to the backup first, committed once it returned."""
        c = self.call(*statements)
        w.write(c.data_version, c.writes)
        self.commit(c)
        return c

    def history(self, n: int) -> List[Call]:
        """A new node's first n calls, committed: the schema, then channel updates."""
        calls = []
        for i in range(n):
            c = self.call(*SCHEMA) if self.version == 0 else self.call(f"INSERT INTO channels VALUES ({i}, 1, 'x{i}')")
            self.commit(c)
            calls.append(c)
        return calls


def dump(path: str) -> List[Tuple[str, list]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return [(t, conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()) for t in tables]
    finally:
        conn.close()


@pytest.fixture(params=sorted(MODES))
def mode(request) -> str:
    return request.param


class Setup:
    def __init__(self, tmp_path: Path, mode: str):
        self.mode = MODES[mode]
        self.dest = tmp_path / "usb" / "pibackup"
        self.dest.mkdir(parents=True)
        self.node = Lightningd(tmp_path / "lightningd.sqlite3")
        self.logs: List[Tuple[str, str]] = []
        self.writers: List[Writer] = []
        self.tmp = tmp_path

    def writer(self, early: Optional[List[Call]] = None, dest: Optional[Path] = None, mode: Optional[str] = None) -> Writer:
        m = MODES[mode] if mode else self.mode
        d = str(dest or self.dest)
        cfg = parse_options({"pibackup-destination": d, "pibackup-mode": m.name})
        w = m.make_writer(d, str(self.node.path), lambda text, level: self.logs.append((level, text)), cfg)
        self.writers.append(w)
        w.start(early or [])
        return w

    def restored(self) -> str:
        out = str(self.tmp / f"restored-{len(os.listdir(self.tmp))}.sqlite3")
        self.mode.restore(str(self.dest), out, RestoreArgs())
        return out

    def close(self) -> None:
        for w in self.writers:
            try:
                w.close()
            except (PibackupError, OSError):
                pass


@pytest.fixture
def s(tmp_path: Path, mode: str):
    setup = Setup(tmp_path, mode)
    yield setup
    setup.close()


def test_a_fresh_node_is_backed_up_from_its_first_call_and_restores_equal(s):
    w = s.writer(s.node.history(3))
    assert w.last == 3 and w.generation is not None and w.failure is None
    s.node.send(w, "INSERT INTO channels VALUES (100, 2, 'live')")
    w.close()
    assert detect(str(s.dest)) is s.mode
    assert dump(s.restored()) == dump(str(s.node.path))
    assert not s.mode.verify(str(s.dest)).damaged


def test_append_rewind_and_a_pragma_only_call(s):
    w = s.writer(s.node.history(2))
    s.node.send(w, "INSERT INTO channels VALUES (10, 1, 'a')")
    lost = s.node.call("INSERT INTO channels VALUES (11, 1, 'never committed')")
    w.write(lost.data_version, lost.writes)  # lightningd died before its commit: sent again, changed
    s.node.send(w, "INSERT INTO channels VALUES (11, 2, 'the one committed')")
    pragma = Call(s.node.version, ["PRAGMA foreign_keys = OFF"])
    w.write(pragma.data_version, pragma.writes)
    s.node.commit(pragma)
    pragma = Call(s.node.version, ["PRAGMA foreign_keys = ON"])
    w.write(pragma.data_version, pragma.writes)
    s.node.commit(pragma)
    s.node.send(w, "UPDATE channels SET state = 3 WHERE id = 10")
    assert w.last == s.node.version == 5
    w.close()
    assert dump(s.restored()) == dump(str(s.node.path))


def test_a_gap_starts_a_new_base_from_the_live_database(s):
    w = s.writer(s.node.history(2))
    first = w.generation
    s.node.commit(s.node.call("INSERT INTO channels VALUES (20, 1, 'committed without the backup')"))
    s.node.send(w, "INSERT INTO channels VALUES (21, 1, 'after the gap')")
    assert w.last == 4 and w.generation != first
    w.close()
    assert dump(s.restored()) == dump(str(s.node.path))


def test_a_live_database_older_than_the_backup_is_refused(s):
    w = s.writer(s.node.history(2))
    shutil.copy(s.node.path, s.tmp / "old.sqlite3")
    s.node.send(w, "INSERT INTO channels VALUES (30, 1, 'newer')")
    w.close()
    s.node.conn.close()
    shutil.copy(s.tmp / "old.sqlite3", s.node.path)
    with pytest.raises(BehindError):
        s.writer()


def test_the_other_modes_directory_is_refused(s):
    early = s.node.history(2)
    for other in sorted(set(MODES) - {s.mode.name}):
        d = s.tmp / f"other-{other}"
        d.mkdir()
        s.writer(early, dest=d, mode=other).close()
        with pytest.raises(PibackupError, match="needs a directory of its own"):
            s.writer(early, dest=d)


def test_a_failure_set_makes_every_write_raise(s):
    w = s.writer(s.node.history(2))
    w.failure = "the fan-out refused a write"
    with pytest.raises(PibackupError, match="the fan-out refused a write"):
        s.node.send(w, "INSERT INTO channels VALUES (40, 1, 'x')")


def test_close_then_restart_continues_the_same_base(s):
    w = s.writer(s.node.history(2))
    s.node.send(w, "INSERT INTO channels VALUES (50, 1, 'a')")
    w.close()
    again = s.writer()
    assert again.last == 3 and again.generation == w.generation
    s.node.send(again, "INSERT INTO channels VALUES (51, 1, 'b')")
    again.close()
    assert dump(s.restored()) == dump(str(s.node.path))


def test_a_vanished_directory_fails_the_write(s):
    w = s.writer(s.node.history(2))
    os.rename(s.dest, s.dest.parent / "moved-away")
    with pytest.raises(PibackupError, match="vanished|replaced"):
        s.node.send(w, "INSERT INTO channels VALUES (60, 1, 'into a detached directory')")


# What each mode answers; a new mode adds its line (and so says what it does).
COMPACT_ANSWER = {"journal": "started", "replica": "refused"}
GROWS_IN_PLACE = {"journal"}


def test_status_keys_the_compact_answer_and_the_protocol_extras(s):
    w = s.writer(s.node.history(2))
    st = w.status()
    assert STATUS_KEYS <= set(st) and st["data_version"] == 2
    assert [d["path"] for d in st["destinations"]] == [str(s.dest)]
    answer = w.compact()
    assert isinstance(answer, CompactAnswer) and answer.outcome == COMPACT_ANSWER[s.mode.name]
    assert answer.outcome != "refused" or answer.reason  # a refusal says why
    assert w.warnings() == [] and w.generation_count() >= 1  # a healthy destination warns of nothing
    seg = w.open_segment()
    if s.mode.name in GROWS_IN_PLACE:  # what shipping copies while it grows
        assert seg is not None and os.path.exists(seg[0]) and seg[1] > 0, seg
    else:
        assert seg is None
    w.flush()
    assert w.last_flush is not None


def test_calls_before_init_on_an_existing_backup_are_kept(s):
    w = s.writer(s.node.history(2))
    w.close()
    early = [s.node.call("INSERT INTO channels VALUES (70, 1, 'before init')")]
    s.node.commit(early[0])  # answered `continue` before init, so lightningd committed it
    again = s.writer(early)
    assert again.last == 3 and again.generation == w.generation
    s.node.send(again, "INSERT INTO channels VALUES (71, 1, 'after init')")
    again.close()
    assert dump(s.restored()) == dump(str(s.node.path))
