"""The core promise on real Core Lightning recordings: replay through the real plugin
process, restore, and get the database lightningd had - also across SIGKILLs."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Dict, List, Sequence

import pytest

import dbcompare
import driver
from conftest import kill_points
from helpers import cli, restore_to

TRACE_NAMES = driver.trace_names()


# The defaults (utxoset filtered, bulk transactions batched) and everything kept and synced.
MODES = {
    "defaults": ({}, ("utxoset",)),
    "unfiltered": ({"pibackup-filter-tables": "none", "pibackup-batch-seconds": 0}, ()),
}


def assert_restore_matches(dest: Path, node: driver.Node, tmp_path: Path, trace: str, filtered: tuple = ("utxoset",)) -> None:
    out = tmp_path / "restored.sqlite3"
    r = restore_to(dest, out)
    assert r.returncode == 0, r.stderr
    assert dbcompare.backup_differences(node.live.path, out, filtered) == []
    real = driver.TRACES / f"{trace}.sqlite3"
    assert dbcompare.backup_differences(real, out, filtered) == []
    v = cli("verify", str(dest))
    assert v.returncode == 0, v.stdout + v.stderr
    if filtered:
        assert "--rescan=-" in r.stdout + r.stderr, "a filtered restore says how to rebuild utxoset"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("trace", TRACE_NAMES)
def test_replayed_trace_restores_to_the_real_lightningd_database(trace, mode, traces, make_node, dest, tmp_path):
    options, filtered = MODES[mode]
    node = make_node(**options)
    driver.run_sessions(node, traces[trace])
    assert node.live.version() == traces[trace][-1].data_version
    assert_restore_matches(dest, node, tmp_path, trace, filtered)
    assert "error" not in [lvl for lvl, _ in node.all_logs], node.log_text()


def sessions(records: Sequence[driver.Record]) -> List[int]:
    """Indexes at which the recording's lightningd (re)started."""
    return [i for i, r in enumerate(records) if r.pre_init and (i == 0 or not records[i - 1].pre_init)]


def replay_with_kills(node: driver.Node, records: Sequence[driver.Record], kills: Dict[int, str], rng: random.Random) -> int:
    """Replay, SIGKILLing the plugin at the given call indexes. Each kill is followed by a
    lightningd restart whose first calls arrive before init, as they do; a "preinit" kill
    also kills that restarted plugin after its early calls, before init (lightningd has
    committed them: the backup must repair that gap). Returns the number of kills done."""
    starts = set(sessions(records))
    done = 0
    i, n = 0, len(records)
    after_kill = kill_before_init = False
    while i < n:
        first = i
        if after_kill:
            next_start = min([s for s in starts if s > i] + [n])
            end_early = min(next_start, i + rng.randint(1 if kill_before_init else 0, 4))
        else:
            end_early = i
            while end_early < n and records[end_early].pre_init and (end_early == i or end_early not in starts):
                end_early += 1
        node.start([], init=False)
        initialised = killed = False
        while True:
            if not initialised and i == end_early:
                if kill_before_init:
                    node.kill()
                    kill_before_init = False
                    after_kill = True
                    break
                node.init()
                initialised = True
            if i >= n or (i in starts and i != first):
                break
            mode = kills.pop(i, None)
            if mode == "preinit":
                node.kill()
                kill_before_init = killed = True
                break
            if mode == "uncommitted":
                node.call_then_crash_before_commit(records[i])
                killed = True
                break
            if mode == "idle":
                node.kill()
                killed = True
                break
            if mode == "inflight":
                delay = rng.choice([0.0, rng.uniform(0, 0.003), rng.uniform(0.003, 0.03)])
                if node.call_and_kill(records[i], delay):
                    i += 1
                killed = True
                break
            node.call(records[i])
            i += 1
        if killed:
            done += 1
            after_kill = True
            continue
        if not initialised:
            assert node.plugin is None
            continue  # killed before init
        after_kill = False
        node.stop()
    return done


def plan_kills(n: int, count: int, rng: random.Random) -> Dict[int, str]:
    kills: Dict[int, str] = {}
    while len(kills) < count:
        i = rng.randrange(5, n - 1)  # not inside the fresh node's split first migration
        kills.setdefault(i, rng.choice(["inflight", "uncommitted", "idle", "preinit"]))
    return kills


@pytest.mark.parametrize("trace", TRACE_NAMES)
def test_sigkill_at_random_points_loses_no_acknowledged_transaction(trace, traces, make_node, tmp_path):
    """PIBACKUP_KILL_POINTS kills in all (default 20; `make test-long`: 500), spread over as
    many full replays as it takes to give each kill a call of its own."""
    records = traces[trace]
    total = kill_points()
    per_round = max(1, len(records) // 4)
    done = rounds = 0
    while done < total:
        rng = random.Random(f"{trace}-{total}-{rounds}")
        kills = plan_kills(len(records), min(per_round, total - done), rng)
        wanted = len(kills)
        dest = tmp_path / f"round{rounds}" / "usb"
        dest.mkdir(parents=True)
        # Generations kept (up to 100), so verify's report below still shows rewinds and gaps.
        node = make_node(**{"pibackup-destination": str(dest), "pibackup-keep-generations": 100})
        got = replay_with_kills(node, records, kills, rng)
        assert got == wanted, (got, wanted)
        assert node.live.version() == records[-1].data_version
        assert_restore_matches(dest, node, tmp_path / f"round{rounds}", trace)
        report = cli("verify", str(dest)).stdout
        # The kills exercised what they claim: rewinds were replaced, gaps started generations.
        if wanted >= 12:
            assert re.search(r", [1-9]\d* rewound", report), report
            # (500 kills make well over 100 generations, gaps and compactions: retention
            # then keeps the newest 100, the most pibackup-keep-generations allows.)
            assert max(int(n) for n in re.findall(r"^gen-(\d{6}):", report, re.M)) >= 2, report
        done += got
        rounds += 1
    print(f"{trace}: {done} SIGKILLs of the plugin in {rounds} replay(s), every acknowledged transaction restored")
