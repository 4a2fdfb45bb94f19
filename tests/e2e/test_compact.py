"""Compaction: a new generation's snapshot built from the old snapshot plus the journal, in
the background, while db_write calls go on; the switch and retention crash-safe at every step."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import pytest

import dbcompare
import driver
from helpers import cli, restore_to
from pibackup.compaction import messages as msg
from pibackup.compaction.messages import Built
from pibackup.compaction.newgen import NewGeneration
from pibackup.errors import DamageError
from pibackup.modes.journal.port import CompactionError
from pibackup.modes.journal.writer import JournalWriter
from pibackup.store import directory as dst
from pibackup.store.follow import JournalFollower
from pibackup.store.layout import segment_filename
from pibackup.store.reader import scan_segment
from pibackup.store.segment import FLAG_DEFLATE, KIND_TX, Frame, SegmentHeader
from pibackup.store.writer import SegmentWriter


def status(node: driver.Node) -> Dict[str, Any]:
    return node.rpc("pibackup-status")


def wait_compacted(node: driver.Node, runs: int) -> Dict[str, Any]:
    """Poll pibackup-status until `runs` compactions are done (never asserts on time; the
    limit only keeps a broken build from hanging the suite)."""
    for _ in range(1200):
        c = status(node)["compaction"]
        if c["state"] == "failed":
            raise AssertionError(c)
        if c["runs"] >= runs and c["state"] == "idle":
            return c
        time.sleep(0.05)
    raise AssertionError(f"compaction did not finish: {c}")


def wait_not_due(node: driver.Node) -> Dict[str, Any]:
    """Poll until no compaction runs and none is due (the journal is under the threshold)."""
    for _ in range(1200):
        c = status(node)["compaction"]
        if c["state"] == "failed":
            raise AssertionError(c)
        if c["state"] == "idle" and (c["compact_at_bytes"] is None or c["journal_bytes"] < c["compact_at_bytes"]):
            return c
        time.sleep(0.05)
    raise AssertionError(f"a compaction due did not run: {c}")


def restored_equals_live(dest: Path, node: driver.Node, out: Path) -> None:
    r = restore_to(dest, out)
    assert r.returncode == 0, r.stderr
    assert dbcompare.backup_differences(node.live.path, out, ("utxoset",)) == []
    v = cli("verify", str(dest))
    assert v.returncode == 0, v.stdout + v.stderr


def tx(v: int) -> tuple:
    return KIND_TX, v, [f"INSERT INTO t VALUES ({v}, 'x{v}')", f"UPDATE vars SET intval={v} WHERE name='data_version'"]


def header(segment: int, **kw: Any) -> SegmentHeader:
    return SegmentHeader(generation=1, generation_id=b"g" * 16, segment=segment, base_version=0, snapshot_sha256=b"\0" * 32, **kw)


@pytest.mark.parametrize("flags", [0, FLAG_DEFLATE], ids=["plain", "deflate"])
def test_the_copy_never_comes_up_short_of_what_the_writer_made_durable(flags, tmp_path):
    # What the compaction copies after the cut is followed up to the writer's durable end.
    # A frame there that cannot be read (bit rot, or a bug) must stop the copy with its
    # place: a new generation short of an answered call must never be switched to.
    gen = tmp_path / "gen-000001"
    gen.mkdir()
    w = SegmentWriter.create(str(gen / segment_filename(1)), header(1, flags=flags), 0)
    for v in range(1, 11):
        w.append(*tx(v))
    cut, seed = w.size, w.checksum
    w.restart_stream()
    for v in range(11, 16):
        w.append(*tx(v))
    f = JournalFollower(str(gen), 1, cut, seed)
    assert [fr.data_version for fr, _ in f.frames(1, w.size, w.checksum)] == list(range(11, 16))
    assert f.position() == (1, w.size)
    # The chain value the writer holds differs from what was read: refused.
    mid = w.size
    w.append(*tx(16))
    with pytest.raises(DamageError, match="checksum chain differs"):
        list(JournalFollower(str(gen), 1, cut, seed).frames(1, w.size, w.checksum ^ 1))
    # A damaged frame below the writer's durable end: refused, with both places.
    for v in range(17, 20):
        w.append(*tx(v))
    data = bytearray((gen / segment_filename(1)).read_bytes())
    data[mid + 12] ^= 0x04
    (gen / segment_filename(1)).write_bytes(bytes(data))
    with pytest.raises(DamageError, match=f"frames end at offset {mid} .*its writer's at {w.size}"):
        list(f.frames(1, w.size))
    w.close()


def test_the_copy_refuses_a_segment_that_does_not_continue_the_one_before(tmp_path):
    gen = tmp_path / "gen-000001"
    gen.mkdir()
    w = SegmentWriter.create(str(gen / segment_filename(1)), header(1), 0)
    for v in range(1, 6):
        w.append(*tx(v))
    cut, seed = w.size, w.checksum
    w.restart_stream()
    w.append(*tx(6))
    w.close()
    w2 = SegmentWriter.create(str(gen / segment_filename(2)), header(2, prev_valid_length=w.size - 1, prev_checksum=w.checksum), 0)
    w2.append(*tx(7))
    w2.close()
    f = JournalFollower(str(gen), 1, cut, seed)
    with pytest.raises(DamageError, match="does not continue the segment before it"):
        list(f.frames(2, w2.size))


def test_the_new_generation_takes_only_frames_that_follow_its_snapshot(tmp_path):
    # Each copied frame appends, repeats (a PRAGMA) or rewinds (sent again) the version
    # before it; anything else would make the new generation unrestorable, so it is refused.
    d = tmp_path / "dest"
    d.mkdir()
    b = JournalWriter(
        str(d), "", print, segment_bytes=1 << 20, filter_tables=frozenset(), batch_seconds=0, batch_bytes=0, preallocate=0
    )
    partial = b.dest.begin_generation(2)
    built = Built(10, b"\0" * 32, 0, 0, [])
    src = dst.Generation(1, str(d / "gen-000001"), [], [])
    ng = NewGeneration(b, partial, 2, built, src)

    def frame(v: int) -> Frame:
        return Frame(KIND_TX, v, [f"UPDATE t SET v={v}"], 0, 0)

    for v in (11, 12, 12, 13):
        ng.add(frame(v))
    for bad in (15, 11, 9):
        with pytest.raises(CompactionError, match=f"data_version {bad} after 13"):
            ng.add(frame(bad))
    ng.flush()
    assert [f.data_version for f in scan_segment(ng.writer.path).frames][1:] == [11, 12, 12, 13]
    ng.abort()


def test_manual_compaction_while_writes_go_on_restores_everything(traces, make_node, dest, tmp_path):
    recs = driver.first_run(traces["A"])
    node = make_node(pibackup_compact_ratio="0")
    node.start([r for r in recs if r.pre_init])
    node.calls(recs[9:300])
    assert node.rpc("pibackup-compact")["compaction"] == "started"
    node.calls(recs[300:420])  # the hook goes on while the child builds the snapshot
    c = wait_compacted(node, 1)
    assert c["last"]["generation"] == "gen-000002" and c["last"]["from"] == "gen-000001"
    node.calls(recs[420:])
    node.stop()
    restored_equals_live(dest, node, tmp_path / "r.sqlite3")
    gens = sorted(p.name for p in dest.iterdir() if p.name.startswith("gen-"))
    assert gens == ["gen-000001", "gen-000002"], gens
    # The cut started no segment (the child replayed the open one up to where it was): every
    # segment but the last was closed by a roll-over, full (128 KiB in these tests).
    segs = sorted((dest / "gen-000001").glob("seg-*.pbj"))
    assert all(scan_segment(str(p)).valid_length >= 128 * 1024 for p in segs[:-1]), [p.stat().st_size for p in segs]
    # The segments closed (by roll-overs and the switch) gave back their preallocated zeros.
    for seg in sorted((dest / "gen-000001").glob("seg-*.pbj")):
        assert scan_segment(str(seg)).valid_length == seg.stat().st_size, seg
    snaps = list((dest / "gen-000002").glob("snapshot-v*.pbsnap"))  # compressed
    assert len(snaps) == 1
    base = int(snaps[0].name[len("snapshot-v") : -len(".pbsnap")])
    assert base == c["last"]["base_version"] and base >= recs[299].data_version - 1


def compaction_processes(plugin_pid: int) -> list:
    """pids of the compaction processes a plugin started (found by the parent pid in their
    arguments, so also after the plugin died and they were handed to init)."""
    mark = f'"parent": {plugin_pid}}}'.encode()
    found = []
    for p in Path("/proc").iterdir():
        try:
            cmd = (p / "cmdline").read_bytes()
        except OSError:
            continue
        if p.name.isdigit() and b"child_main" in cmd and mark in cmd:
            found.append(int(p.name))
    return found


def wait_no_compaction_process(plugin_pid: int) -> None:
    for _ in range(200):
        if not compaction_processes(plugin_pid):
            return
        time.sleep(0.05)
    raise AssertionError(f"compaction processes left: {compaction_processes(plugin_pid)}")


def stop_a_compaction_process(node: driver.Node, recs, i: int) -> tuple:
    """Make calls from recs[i] on until a compaction process is running, and SIGSTOP it there.
    Returns (its pid, the index of the next call)."""
    assert node.plugin is not None
    while i < len(recs):
        node.call(recs[i])
        i += 1
        for child in compaction_processes(node.plugin.proc.pid):
            if hold(child):
                return child, i
    raise AssertionError("no compaction process ran")


def test_at_a_high_rate_the_next_process_starts_ahead_and_goes_when_unused(traces, make_node, dest, tmp_path):
    # Journal written during a compaction that is a good part of the next threshold makes the
    # plugin start the next compaction's process ahead. Such a rate is made certain here, not
    # left to the machine's speed: the compaction's process is held (SIGSTOP) while 200 calls
    # go on. One spare left unused is stopped (after 60 s; 1 s here), and none outlives the plugin.
    recs = driver.first_run(traces["A"])
    node = make_node(pibackup_compact_ratio="0.05")
    node.plugin_env = {"PIBACKUP_TEST_SPARE_IDLE": "1"}
    node.start([r for r in recs if r.pre_init])
    assert node.plugin is not None
    pid = node.plugin.proc.pid
    held, i = stop_a_compaction_process(node, recs, 9)
    assert status(node)["compaction"]["state"] != "idle"
    node.calls(recs[i : i + 200])
    os.kill(held, signal.SIGCONT)
    node.calls(recs[i + 200 :])
    runs = -1
    settled = 0
    for _ in range(1200):  # until no compaction has run for a while (the last may follow the last call)
        c = status(node)["compaction"]
        settled = settled + 1 if c["state"] == "idle" and c["runs"] == runs else 0
        runs = c["runs"]
        if settled == 10:
            break
        time.sleep(0.05)
    assert c["runs"] >= 1 and c["processes_started_ahead"] >= 1, c
    wait_no_compaction_process(pid)  # the spare's second is up: it is gone, the plugin is not
    assert status(node)["state"] == "ok"
    node.stop()
    restored_equals_live(dest, node, tmp_path / "r.sqlite3")


def test_compaction_processes_die_with_the_plugin(traces, make_node, dest):
    recs = driver.first_run(traces["A"])
    node = make_node(pibackup_compact_ratio="0.05")
    node.start([r for r in recs if r.pre_init])
    assert node.plugin is not None
    pid = node.plugin.proc.pid
    seen = False
    for r in recs[9:]:
        node.call(r)
        if compaction_processes(pid):
            seen = True
            break
    assert seen, "no compaction process ran"
    node.kill()  # SIGKILL: nothing in the plugin gets to stop them
    wait_no_compaction_process(pid)


# Each step of a compaction, in order (pibackup/compaction/compactor.py, FORMAT.md "Compaction"): the
# plugin (or its child) SIGKILLs itself there, as a power cut or a kill would stop it.
PLUGIN_STEPS = ["cut", "segment", "follow", "switch-synced", "switch-renamed", "retention"]
CHILD_STEPS = ["child-replay", "child-snapshot"]


def calls_until_dead(node: driver.Node, recs, i: int) -> int:
    """Go on with lightningd's calls until the plugin dies; returns the index of the first
    call that was not committed."""
    while True:
        try:
            if i < len(recs):
                node.call(recs[i])
                i += 1
            else:
                c = status(node)["compaction"]
                assert c["state"] == "running", f"the compaction ended without reaching the crash point: {c}"
                time.sleep(0.02)
        except driver.PluginDied:
            node.kill()
            return i
        if i == len(recs) and node.plugin is not None and node.plugin.proc.poll() is not None:
            node.kill()
            return i


@pytest.mark.parametrize("step", PLUGIN_STEPS)
def test_plugin_killed_at_each_compaction_step_loses_nothing(step, traces, make_node, dest, tmp_path):
    recs = driver.first_run(traces["A"])[:450]
    # Every acknowledged transaction synced (no batching), so a restore after the crash must
    # equal lightningd's database exactly; keep 1 generation, so the switch deletes the old one.
    node = make_node(pibackup_compact_ratio="0", pibackup_batch_seconds=0, pibackup_keep_generations=1)
    node.plugin_env = {"PIBACKUP_TEST_CRASH": step}
    node.start([r for r in recs if r.pre_init])
    node.calls(recs[9:250])
    try:
        assert node.rpc("pibackup-compact")["compaction"] == "started"
    except driver.PluginDied:  # the cut takes no sync: the kill there can beat the answer
        assert step == "cut"
        node.kill()
        i = 250
    else:
        # It returns once the plugin has died at the step (a slow machine may get there only
        # after the last call: the compaction runs at nice 19, so the kill may find it idle).
        i = calls_until_dead(node, recs, 250)
    # A restore of what the crash left: every committed transaction. The call in flight at
    # the kill may be in it too (journalled, answer lost): lightningd resends that
    # data_version at its restart, and it replaces the journalled one (a rewind).
    out = tmp_path / "after-crash.sqlite3"
    r = restore_to(dest, out)
    assert r.returncode == 0, r.stderr
    if dbcompare.backup_differences(node.live.path, out, ("utxoset",)):
        assert i < len(recs)
        ahead = tmp_path / "live-plus-inflight.sqlite3"
        shutil.copy(node.live.path, ahead)
        db = driver.LiveDB(ahead)
        db.commit(recs[i].writes)
        db.close()
        assert dbcompare.backup_differences(ahead, out, ("utxoset",)) == []
    assert cli("verify", str(dest)).returncode == 0
    names = sorted(p.name for p in dest.iterdir() if p.name.startswith("gen-"))
    if step == "cut":
        assert names == ["gen-000001"], names
    elif step in ("segment", "follow", "switch-synced"):
        assert "gen-000002.partial" in names and "gen-000002" not in names, names
    else:
        assert "gen-000002" in names, names
    # lightningd restarts: its first call is the one that was never committed (if any).
    node.plugin_env = {}
    node.start(recs[i : i + 1])
    node.calls(recs[i + 1 :])
    node.stop()
    names = sorted(p.name for p in dest.iterdir() if p.name.startswith("gen-"))
    assert not [n for n in names if "." in n], names  # .partial and .deleted removed at the start
    restored_equals_live(dest, node, tmp_path / "after-restart.sqlite3")


@pytest.mark.parametrize("step", CHILD_STEPS)
def test_compaction_process_killed_fails_the_compaction_not_the_backup(step, traces, make_node, dest, tmp_path):
    recs = driver.first_run(traces["A"])[:450]
    node = make_node(pibackup_compact_ratio="0", pibackup_batch_seconds=0)
    node.plugin_env = {"PIBACKUP_TEST_CRASH": step}
    node.start([r for r in recs if r.pre_init])
    node.calls(recs[9:300])
    node.rpc("pibackup-compact")
    node.calls(recs[300:320])
    for _ in range(1200):
        c = status(node)["compaction"]
        if c["state"] == "failed":
            break
        time.sleep(0.05)
    assert c["state"] == "failed" and "compaction process died" in c["error"], c
    assert not list(dest.glob("gen-*.partial"))  # cleaned up at once
    node.calls(recs[320:])
    node.stop()
    assert "compaction failed" in node.log_text()  # (logged just after the state is set: read after the stop)
    restored_equals_live(dest, node, tmp_path / "r.sqlite3")
    assert sorted(p.name for p in dest.iterdir() if p.name.startswith("gen-")) == ["gen-000001"]


def generation_dirs(dest: Path) -> list:
    return sorted(p.name for p in dest.iterdir() if p.name.startswith("gen-"))


def test_automatic_compaction_keeps_the_backup_bounded_across_restarts(traces, make_node, dest, tmp_path):
    """A low ratio and floor: the journal passes them again and again. Never more than
    keep-generations (2) generation directories, counting the one being built, and each
    restart goes on in the compacted generation."""
    recs = traces["A"]
    node = make_node(pibackup_compact_ratio="0.3", pibackup_compact_min_kb=64)
    most = 0

    def watch(n: driver.Node) -> None:
        nonlocal most
        most = max(most, len(generation_dirs(dest)))

    i = 0
    sessions = [k for k, r in enumerate(recs) if r.pre_init and (k == 0 or not recs[k - 1].pre_init)] + [len(recs)]
    for s, e in itertools.pairwise(sessions):
        early = [r for r in recs[s:e] if r.pre_init]
        node.start(early)
        for i in range(s + len(early), e):
            node.call(recs[i])
            if i % 25 == 0:
                watch(node)
            # One compaction at a time with the calls: how many there are then depends on the
            # journal's size, not on how fast this machine compacts (a slow compaction takes in
            # the journal of several thresholds: fewer runs, each as bounded).
            wait_not_due(node)
        c = wait_not_due(node)
        watch(node)
        node.stop()
    runs = node.log_text().count("compacted gen-")
    assert runs >= 3, node.log_text()
    assert most <= 2 and len(generation_dirs(dest)) == 2
    assert "from a snapshot" not in node.log_text()  # no gap: restarts went on where they were
    assert c["keep_generations"] == 2
    restored_equals_live(dest, node, tmp_path / "r.sqlite3")
    real = driver.TRACES / "A.sqlite3"
    assert dbcompare.backup_differences(real, tmp_path / "r.sqlite3", ("utxoset",)) == []


def test_a_rewind_of_the_transaction_copied_into_the_new_generation(traces, make_node, dest, tmp_path):
    """The newest transaction at the switch is not known committed: it goes into the new
    generation's journal, not its snapshot, so the resend after lightningd's crash replaces it."""
    recs = driver.first_run(traces["A"])[:300]
    node = make_node(pibackup_compact_ratio="0")
    node.start([r for r in recs if r.pre_init])
    node.calls(recs[9:200])
    nxt = recs[200]
    bogus = driver.Record(
        0,
        False,
        nxt.data_version,
        (
            "INSERT INTO vars (name, intval) VALUES ('never_committed', 1);",
            f"UPDATE vars SET intval = intval + 1 WHERE name = 'data_version' AND intval = {nxt.data_version - 1}",
        ),
    )
    assert node.plugin is not None
    resp = node.plugin.request("db_write", {"data_version": bogus.data_version, "writes": list(bogus.writes)})
    assert resp["result"] == {"result": "continue"}  # ... and lightningd dies before its commit
    node.rpc("pibackup-compact")
    c = wait_compacted(node, 1)
    assert c["last"]["base_version"] == nxt.data_version - 1
    node.kill()
    node.start([nxt])
    node.calls(recs[201:])
    node.stop()
    out = tmp_path / "r.sqlite3"
    restored_equals_live(dest, node, out)
    assert generation_dirs(dest) == ["gen-000001", "gen-000002"]
    assert ", 1 rewound" in cli("verify", str(dest)).stdout


def test_stop_during_a_compaction_leaves_no_partial_and_loses_nothing(traces, make_node, dest, tmp_path):
    recs = driver.first_run(traces["A"])[:300]
    node = make_node(pibackup_compact_ratio="0")
    node.start([r for r in recs if r.pre_init])
    i = 250
    node.calls(recs[9:i])
    while True:  # stopped while its process is held: certain to be mid-compaction
        node.rpc("pibackup-compact")
        if hold_the_compaction(node) is not None:
            break
        node.calls(recs[i : i + 5])
        i += 5
    assert status(node)["compaction"]["state"] == "running"
    assert node.stop() == 0
    assert not [n for n in generation_dirs(dest) if "." in n]
    node.start([])
    node.calls(recs[i:])
    node.stop()
    restored_equals_live(dest, node, tmp_path / "r.sqlite3")


def hold(pid: int) -> bool:
    """SIGSTOP a process; True if it is now stopped (not ended, not a zombie)."""
    try:
        os.kill(pid, signal.SIGSTOP)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (ProcessLookupError, FileNotFoundError):
        return False


def hold_the_compaction(node: driver.Node) -> Optional[int]:
    """After pibackup-compact: SIGSTOP the compaction's process (it exists only after the
    cut) and return its pid; None if the compaction ended before it could be caught."""
    assert node.plugin is not None
    for _ in range(2000):
        for child in compaction_processes(node.plugin.proc.pid):
            if hold(child):
                return child
        if status(node)["compaction"]["state"] != "running":
            return None
        time.sleep(0.005)
    raise AssertionError("the compaction's process never showed")


@pytest.mark.parametrize("when", ["while", "before"])
def test_a_gap_during_a_compaction_wins_over_it(when, traces, make_node, dest, tmp_path):
    """lightningd committed a transaction without us while a compaction ran: the gap's new
    generation (from the live DB) is the newest and the compaction is dropped. A gap just
    before a compaction leaves it nothing to compact. Either way nothing is lost and no
    generation number is reused."""
    recs = driver.first_run(traces["A"])[:320]
    node = make_node(pibackup_compact_ratio="0")
    node.start([r for r in recs if r.pre_init])
    i = 250
    node.calls(recs[9:i])
    if when == "while":
        while True:  # the compaction's process held while the gap and the calls after it come
            node.rpc("pibackup-compact")
            held = hold_the_compaction(node)
            if held is not None:
                break
            node.calls(recs[i : i + 5])  # (it finished before it could be held: again)
            i += 5
        gens = [n for n in generation_dirs(dest) if "." not in n]  # (and the .partial being built)
        node.commit_without_plugin(recs[i])
        node.calls(recs[i + 1 :])
        os.kill(held, signal.SIGCONT)
    else:
        gens = generation_dirs(dest)
        node.commit_without_plugin(recs[i])
        node.calls(recs[i + 1 : i + 2])  # the gap's generation holds no transaction known committed yet
        node.rpc("pibackup-compact")
    c = wait_not_due(node)
    node.calls(recs[i + 2 :] if when == "before" else [])
    node.stop()
    names = generation_dirs(dest)
    restored_equals_live(dest, node, tmp_path / "r.sqlite3")
    log = node.log_text()
    assert "gap" in log and "compaction failed" not in log and c["state"] == "idle", (c, log)
    last = int(gens[-1][4:])
    if when == "while":
        assert "this compaction is dropped" in log, log
        # gen-N+1 was being built when the gap took gen-N+2: the number is not reused.
        assert names == [gens[-1], f"gen-{last + 2:06d}"], (gens, names)
    else:
        assert "nothing to compact" in log and names == [gens[-1], f"gen-{last + 1:06d}"], (gens, names, log)


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("pibackup-compact-ratio", "lots", "give a number from 0.05 to 100"),
        ("pibackup-compact-ratio", "-1", "give a number from 0.05 to 100"),
        ("pibackup-compact-ratio", "nan", "give a number from 0.05 to 100"),
        ("pibackup-compact-ratio", "0.01", "or 0 for no automatic compaction"),
        ("pibackup-keep-generations", 0, "is out of range: give 1 to 100 generations"),
        ("pibackup-compact-min-kb", 1, "is out of range: give 64 to"),
    ],
)
def test_bad_compaction_option_gets_a_clear_message(name, value, message):
    from pibackup.app.config import parse_options
    from pibackup.errors import PibackupError

    with pytest.raises(PibackupError) as e:
        parse_options({"pibackup-destination": "/media/usb/pibackup", name: value})
    assert message in str(e.value) and name in str(e.value)


def test_sigkill_at_random_points_while_compacting_loses_no_acknowledged_transaction(traces, make_node, tmp_path):
    """The kill test of test_traces.py with a compaction started every 64 KiB of journal:
    kills land before, during and after compactions. An unclean kill usually starts a new
    generation, whose journal must grow 64 KiB (about 150 calls) before it is compacted, so
    at most 5 kills per replay. A fifth as many kills as there (PIBACKUP_KILL_POINTS:
    4 by default, 100 in `make test-long`)."""
    import random

    from test_traces import assert_restore_matches, plan_kills, replay_with_kills

    from conftest import kill_points

    records = traces["A"]
    total = max(4, kill_points() // 5)
    done = rounds = compactions = 0
    kills_in_compaction: set = set()  # the rounds with a kill while a new generation was being built
    while done < total:
        rng = random.Random(f"compact-{total}-{rounds}")
        kills = plan_kills(len(records), min(5, total - done), rng)
        wanted = len(kills)
        dest = tmp_path / f"round{rounds}" / "usb"
        dest.mkdir(parents=True)
        node = make_node(
            **{"pibackup-destination": str(dest), "pibackup-compact-ratio": "0.05", "pibackup-compact-min-kb": 64}
        )
        node.kill = counting_kill(node, dest, lambda r=rounds: kills_in_compaction.add(r))  # type: ignore[method-assign]
        try:
            assert replay_with_kills(node, records, kills, rng) == wanted
        except driver.Halted as e:
            raise AssertionError(f"halted: {e}\n{node.log_text()}") from e
        assert_restore_matches(dest, node, tmp_path / f"round{rounds}", "A")
        compactions += node.log_text().count("compacted gen-")
        done += wanted
        rounds += 1
    # Whether a compaction has finished by the time of a kill depends on this machine's speed
    # (its process runs at nice 19): either way it was there, before the kill or under it.
    assert compactions + len(kills_in_compaction) >= rounds, "the kills were meant to land around compactions"
    print(
        f"A: {done} SIGKILLs while compacting ({compactions} compactions, {len(kills_in_compaction)} rounds with a kill "
        "while a new generation was being built), every acknowledged transaction restored"
    )


def counting_kill(node: driver.Node, dest: Path, during: Callable[[], None]) -> Callable[[], None]:
    """node.kill, calling `during` first when a compaction is building a new generation."""
    kill = node.kill

    def counted() -> None:
        if any(dest.glob("gen-*.partial")):
            during()
        kill()

    return counted


def wait_failed(node: driver.Node) -> Dict[str, Any]:
    for _ in range(1200):
        c = status(node)["compaction"]
        if c["state"] == "failed":
            return c
        assert c["state"] == "running" or c["runs"] == 0, c
        time.sleep(0.05)
    raise AssertionError(c)


@pytest.mark.parametrize("point", ["generation-rename", "generation-renamed"])
def test_an_io_error_at_the_switch_loses_nothing(point, traces, make_node, dest, tmp_path):
    """Before the new generation's rename, an I/O error fails the compaction and the backup
    goes on in the old generation. After it (the directory's sync failed), a restore may
    find either generation, and the new one gets no more frames: the backup fails, and
    lightningd halts at its next write. Nothing answered is lost either way."""
    recs = driver.first_run(traces["A"])[:450]
    fault = tmp_path / "fault"
    node = make_node(pibackup_compact_ratio="0", pibackup_batch_seconds=0)
    node.plugin_env = {"PIBACKUP_TEST_FAULT": str(fault)}
    node.start([r for r in recs if r.pre_init])
    node.calls(recs[9:300])
    fault.write_text(point)
    node.rpc("pibackup-compact")
    c = wait_failed(node)
    assert "I/O error on the backup medium" in c["error"], c
    fault.unlink()  # the medium works again: what was left must still restore whole
    if point == "generation-rename":
        assert generation_dirs(dest) == ["gen-000001"]
        node.calls(recs[300:])
        assert status(node)["state"] == "ok"
        node.stop()
        restored_equals_live(dest, node, tmp_path / "r.sqlite3")
        return
    assert generation_dirs(dest) == ["gen-000001", "gen-000002"]
    assert "lightningd will be halted at its next database write" in node.log_text()
    assert status(node)["state"] == "failed"
    with pytest.raises(driver.Halted):
        node.call(recs[300])
    restored_equals_live(dest, node, tmp_path / "after-fault.sqlite3")
    node.start(recs[300:301])  # lightningd restarted by its owner
    node.calls(recs[301:])
    node.stop()
    restored_equals_live(dest, node, tmp_path / "after-restart.sqlite3")


def flip_bit(path: Path, offset: int) -> None:
    """Bit rot: one bit changed in place (the file is not rewritten)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


@pytest.mark.parametrize("where", ["journal", "snapshot"])
def test_a_damaged_generation_is_replaced_by_a_snapshot_of_the_live_db_at_the_next_call(where, traces, make_node, dest, tmp_path):
    # Bit rot on the stick, found by a compaction: a restore of that generation would stop
    # at the damage, short of answered calls. The next call starts a new generation from
    # the live database; the damaged one is kept as it is, and nothing answered is lost.
    recs = driver.first_run(traces["A"])[:400]
    node = make_node(pibackup_compact_ratio="0", pibackup_segment_size="64K")
    node.start([r for r in recs if r.pre_init])
    node.calls(recs[9:290])
    if where == "journal":
        victim = dest / "gen-000001" / "seg-000001.pbj"
        assert (dest / "gen-000001" / "seg-000002.pbj").exists()  # so seg-000001 is closed
        frames = scan_segment(str(victim)).frames
        offset = frames[len(frames) // 2].offset + 20
        place = f"{victim}: damaged at offset {offset - 20}"
    else:
        node.rpc("pibackup-compact")  # gen-000002 starts from a snapshot
        wait_compacted(node, 1)
        victim = next((dest / "gen-000002").glob("snapshot-v*.pbsnap"))
        offset = victim.stat().st_size // 2
        place = f"{victim}: snapshot is damaged"
    node.calls(recs[290:300])
    flip_bit(victim, offset)
    damaged = generation_dirs(dest)[-1]
    assert node.rpc("pibackup-compact")["compaction"] == "started"
    c = wait_failed(node)
    assert place in c["error"], c
    for _ in range(1200):  # the warning, the log line and the DAMAGED file come right after the failed state
        st = status(node)  # the health check says so too (status, systemd, LED)
        marked = any("is damaged" in w for w in st["warnings"]) and (dest / damaged / "DAMAGED").exists()
        if marked and f"backup generation {damaged} is damaged" in node.log_text():
            break
        time.sleep(0.05)
    assert st["state"] == "warning" and any("is damaged" in w for w in st["warnings"]), st
    assert f"backup generation {damaged} is damaged" in node.log_text(), node.log_text()
    assert "next database write" in node.log_text(), node.log_text()
    refused = node.rpc("pibackup-compact")  # compacting it again would only read the damage again
    assert refused["compaction"] == "refused" and "is damaged" in refused["reason"], refused
    assert (dest / damaged / "DAMAGED").exists()
    node.calls(recs[300:301])  # lightningd's next write: a new generation, from the live database
    assert f"replacing the damaged {damaged}" in node.log_text()
    st = status(node)
    assert st["generation"] != damaged and damaged in generation_dirs(dest), (st["generation"], generation_dirs(dest))
    assert st["warnings"] == [] and st["state"] == "ok", st
    node.calls(recs[301:])
    node.stop()
    r = restore_to(dest, tmp_path / "r.sqlite3")
    assert r.returncode == 0, r.stderr
    assert dbcompare.backup_differences(node.live.path, tmp_path / "r.sqlite3", ("utxoset",)) == []
    # verify still finds the damage, in the damaged generation only.
    v = cli("verify", str(dest))
    assert v.returncode == 1 and str(victim) in v.stdout and "found it damaged" in v.stdout, v.stdout
    newest = [line for line in v.stdout.splitlines() if "newest" in line]
    assert newest and damaged not in newest[0], v.stdout
    r = restore_to(dest, tmp_path / "old.sqlite3", "--generation", str(int(damaged[4:])), "--partial")
    assert r.returncode != 0 and str(victim) in r.stderr, r.stderr


def test_a_generation_found_damaged_is_not_continued_after_a_restart(traces, make_node, dest, tmp_path):
    # The plugin stops (or dies) between finding the damage and lightningd's next write:
    # the mark on the medium makes the next start begin a new generation all the same.
    recs = driver.first_run(traces["A"])[:400]
    node = make_node(pibackup_compact_ratio="0", pibackup_segment_size="64K")
    node.start([r for r in recs if r.pre_init])
    node.calls(recs[9:300])
    victim = dest / "gen-000001" / "seg-000001.pbj"
    flip_bit(victim, scan_segment(str(victim)).frames[5].offset + 20)
    node.rpc("pibackup-compact")
    wait_failed(node)
    for _ in range(200):
        if (dest / "gen-000001" / "DAMAGED").exists():
            break
        time.sleep(0.05)
    node.kill()
    node.start(recs[300:302])
    assert "gen-000001 is damaged" in node.log_text() and "a compaction found it damaged" in node.log_text()
    assert status(node)["generation"] == "gen-000002"
    node.calls(recs[302:])
    node.stop()
    r = restore_to(dest, tmp_path / "r.sqlite3")
    assert r.returncode == 0, r.stderr
    assert dbcompare.backup_differences(node.live.path, tmp_path / "r.sqlite3", ("utxoset",)) == []


def test_a_full_stick_fails_the_compaction_not_the_node(traces, make_node, tmp_path):
    from helpers import tmpfs

    recs = driver.first_run(traces["A"])[:400]
    with tmpfs(tmp_path / "stick", "size=420k") as mnt:
        dest = mnt / "pibackup"
        dest.mkdir()
        node = make_node(
            pibackup_compact_ratio="0", pibackup_destination=str(dest), pibackup_preallocate_kb=16, pibackup_batch_seconds=0
        )
        node.start([r for r in recs if r.pre_init])
        node.calls(recs[9:300])
        node.rpc("pibackup-compact")  # the new snapshot (~330 KB) does not fit next to the journal
        c = wait_failed(node)
        assert "the backup medium is full" in c["error"], c
        assert not list(dest.glob("gen-*.partial"))  # its space is given back at once
        node.calls(recs[300:])
        node.stop()
        restored_equals_live(dest, node, tmp_path / "r.sqlite3")


def test_compact_before_init_is_refused_with_a_reason(make_node):
    node = make_node()
    node.start([], init=False)
    r = node.rpc("pibackup-compact")
    assert r["compaction"] == "refused" and "has not started yet" in r["reason"]
    node.kill()


def test_the_messages_to_and_from_the_compaction_process_keep_their_wire_form():
    # The child may be a spare started by an older plugin (never: same process tree), but the
    # lines are the protocol FORMAT.md's readers see in a trace: their keys do not change.
    assert msg.Start(42).encode() == '{"parent": 42}' and msg.Start.decode('{"parent": 42}') == msg.Start(42)
    job = msg.Job("/d", 3, 2, 100, 7, "/d/gen-000004.partial")
    line = job.encode()
    assert line == (
        '{"destination": "/d", "generation": 3, "segments": 2, "limit": 100, "checksum": 7, '
        '"partial": "/d/gen-000004.partial"}\n'
    )
    assert msg.Job.decode(line) == job
    assert msg.At(2, 64).encode() == '{"at": [2, 64]}\n' and msg.At.decode(b'{"at": [2, 64]}\n') == msg.At(2, 64)
    assert msg.At.decode(b'{"nothing": "x"}\n') is None
    assert msg.decode_reply(msg.More(2, 99).encode()) == msg.More(2, 99) and msg.More(2, 99).encode() == '{"more": [2, 99]}\n'
    assert msg.decode_reply(msg.Done().encode()) == msg.Done() and msg.Done().encode() == '{"done": true}\n'
    built = msg.Built(10, b"\1" * 32, 4096, 5, [(1, 11, ["UPDATE t SET v=1"])], (2, 64))
    assert msg.decode_result(built.encode().encode()) == built
    assert '"sha256": "' + "01" * 32 + '"' in built.encode()
    assert msg.decode_result(msg.Nothing("why").encode().encode()) == msg.Nothing("why")
    assert msg.Failed("bad").encode() == '{"error": "bad"}\n'
    assert msg.Failed("bad", damaged=False).encode() == '{"error": "bad", "damaged": false}\n'
    assert msg.decode_result(b'{"error": "bad", "damaged": true}') == msg.Failed("bad", True)


def test_a_damage_report_only_affects_the_generation_still_written(traces, tmp_path):
    # In-process: the writer as the plugin holds it. A report about a generation the writer
    # has left (a gap moved on meanwhile) changes nothing; a call from the past is refused
    # as before, and does not consume the repair; the next call that follows repairs.
    from pibackup.modes.api import BehindError, Call

    recs = driver.first_run(traces["A"])
    live = driver.LiveDB(tmp_path / "live.sqlite3")
    d = tmp_path / "dest"
    d.mkdir()
    logs: list = []
    b = JournalWriter(str(d), str(live.path), lambda m, lvl="info": logs.append(m), segment_bytes=1 << 20,
               filter_tables=frozenset({"utxoset"}), batch_seconds=0, batch_bytes=0, preallocate=0)
    for r in recs[:9]:
        live.commit(r.writes)
    b.start([Call(r.data_version, list(r.writes)) for r in recs[:9]])
    for r in recs[9:60]:
        b.write(r.data_version, list(r.writes))
        live.commit(r.writes)
    gen = b.generation
    assert gen is not None
    b.mark_damaged(str(d / "gen-000007"), "bit rot elsewhere")
    assert b.damaged is None and not (d / "gen-000007").exists()
    b.mark_damaged(gen, "bit rot")
    assert b.damaged == "bit rot" and (Path(gen) / "DAMAGED").read_text() == "bit rot\n"
    assert b.warnings() == [
        f"the backup in {d} is damaged (bit rot); a new generation is started from a snapshot of "
        "the live database at lightningd's next database write"
    ]
    with pytest.raises(BehindError):
        b.write(recs[30].data_version, list(recs[30].writes))
    assert b.damaged == "bit rot" and b.generation == gen
    b.write(recs[60].data_version, list(recs[60].writes))
    live.commit(recs[60].writes)
    assert b.damaged is None and b.generation != gen and b.base_version == recs[59].data_version
    assert b.warnings() == []
    assert any("replacing the damaged gen-000001" in m for m in logs), logs
    b.close()
    live.close()
