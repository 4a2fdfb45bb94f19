"""Crash-state exploration (tests/crashstates.py): every state a power cut
may leave on the backup medium, by POSIX, at every point of a real recording's replay, must
restore to lightningd's database with every acknowledged transaction in it."""

from __future__ import annotations

import os

import pytest

import crashstates as cs


@pytest.fixture(scope="module")
def small(traces, tmp_path_factory):
    sc = cs.small_scenario(traces["A"])
    rec = cs.record(sc, tmp_path_factory.mktemp("crash-small"))
    return rec


def test_the_recording_holds_what_the_model_needs(small):
    """The strace log saw the plugin's whole life on the medium: the marker, both generations,
    the snapshot made by SQLite's backup API, segment rollovers, syncs of files and of
    directories, and an answer for every call the plugin got."""
    ops, is_dir = cs.build_ops(small)
    whats = [o.what for o in ops]
    for needle in (
        "rename",
        "PIBACKUP",
        "gen-000001.partial",
        "gen-000002.partial",
        "snapshot.tmp",
        "seg-000002.pbj",
        "seg-000003.pbj",
    ):
        assert any(needle in w for w in whats), needle
    assert any(o.kind == "sync" and is_dir.get(o.ino) for o in ops), "no directory fsync seen"
    acked = [i for o in ops if o.kind == "ack" for i in o.records]
    without = [s.index for s in small.scenario.steps if s.kind == "without"]
    assert acked == [i for i in range(len(small.scenario.records)) if i not in without]
    assert [i for o in ops if o.kind == "ready" for i in o.records] == [
        i for s in small.scenario.steps if s.kind == "start" for i in s.early
    ]


def test_every_crash_state_restores_every_acknowledged_transaction(small, tmp_path):
    """`make test`'s sample: every crash point around the operations that are not plain
    appends, one in 20 of the rest, a few torn variants of each write; a CLI restore and a
    restarted plugin on some of them. `make test-long` runs every crash point of a whole
    recording (test_all_crash_states_of_a_recording)."""
    ops, _ = cs.build_ops(small)
    points = cs.sample_points(ops, 20)
    fig = cs.explore(small, tmp_path / "work", cuts="few", points=points, cli_every=80, restart_every=120, restart_special=1)
    print(fig.line())
    assert fig.failures == [], "\n".join(fig.failures[:5])
    # A floor against an exploration that silently shrank (148 with appends written as whole
    # sectors with O_DIRECT, 150 and more before).
    assert fig.restored >= 140, fig.line()
    assert fig.torn_read_as_torn > 0 and fig.reordered_damage > 0 and fig.memo_hits > 0, fig.line()
    assert fig.cli_checked >= 2 and fig.restarts_checked >= 2, fig.line()


def test_the_exploration_catches_an_answer_given_before_the_fdatasync(small, tmp_path):
    """The checker can fail: with every answer moved in front of the sync before it (a writer
    that acknowledges what is only in the page cache), states that lose an acknowledged
    transaction appear and are reported."""
    ops, _ = cs.build_ops(small)
    moved = list(ops)
    for k in range(1, len(moved)):
        if moved[k].kind == "ack" and moved[k - 1].kind == "sync":
            moved[k - 1], moved[k] = moved[k], moved[k - 1]
    points = [k for k in range(1, len(moved)) if moved[k - 1].kind == "ack"][100:110]
    fig = cs.explore(small, tmp_path / "work", cuts="few", points=points, ops=moved)
    assert any("was acknowledged" in f for f in fig.failures), fig.line()


@pytest.mark.long
@pytest.mark.parametrize("trace", ["A", "filler-A"])
def test_all_crash_states_of_a_recording(trace, traces, tmp_path):
    """`make test-long`: every crash point of a whole recording, every torn variant, a CLI
    restore and a restarted plugin on a sample; prints the figures README quotes."""
    rec = cs.record(cs.full_scenario(trace, traces[trace]), tmp_path / "rec")
    every = int(os.environ.get("PIBACKUP_CRASH_SAMPLE_EVERY", "150"))
    fig = cs.explore(rec, tmp_path / "work", cuts="all", cli_every=every, restart_every=2 * every, restart_special=10, log=print)
    print(fig.line())
    assert fig.failures == [], "\n".join(fig.failures[:5])
