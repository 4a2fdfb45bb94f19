"""Filtering and write tiers: what is dropped, what waits in memory, and that the durable
journal is always a prefix of the transaction stream holding every critical transaction."""

from __future__ import annotations

import sqlite3
import time

import pytest

import dbcompare
import driver
from driver import Halted, Record
from helpers import cli, restore_to
from pibackup.rules.filter import FilterError, classify, parse_filter


def is_bulk(r: Record) -> bool:
    return not classify(r.writes, {"utxoset"}).critical


def restored_version(dest, tmp_path, name) -> int:
    out = tmp_path / name
    r = restore_to(dest, out)
    assert r.returncode == 0, r.stderr
    return sqlite3.connect(out).execute("SELECT intval FROM vars WHERE name='data_version'").fetchone()[0]


def test_classification_of_real_transactions(traces):
    recs = traces["filler-A"]
    block = next(r for r in recs if any(w.startswith("INSERT INTO blocks") for w in r.writes))
    c = classify(block.writes, {"utxoset"})
    assert not c.critical and c.dropped > 0
    assert not any("utxoset" in w for w in c.writes if not w.startswith("DELETE FROM blocks"))
    htlc = next(r for r in recs if any(w.startswith("UPDATE channel_htlcs") for w in r.writes))
    assert classify(htlc.writes, {"utxoset"}).critical
    assert classify(["UPDATE vars SET intval=9 WHERE name='bip32_max_index';"], ()).critical  # unknown var key
    assert classify(["INSERT INTO some_future_table VALUES (1)"], ()).critical  # unknown table
    assert classify(["CREATE TABLE utxoset (x)"], {"utxoset"}).writes == ["CREATE TABLE utxoset (x)"]  # schema kept


def test_text_that_merely_mentions_a_filtered_table_is_not_mistaken_for_a_read():
    stmt = "INSERT INTO invoices (label) VALUES ('coffee FROM utxoset JOIN utxoset')"
    assert classify([stmt], {"utxoset"}).writes == [stmt]


def test_a_statement_reading_a_filtered_table_to_write_another_is_refused():
    with pytest.raises(FilterError, match="reads the filtered table utxoset"):
        classify(["INSERT INTO outputs SELECT txid, outnum FROM utxoset WHERE spendheight IS NULL"], {"utxoset"})
    with pytest.raises(FilterError, match="reads the filtered table utxoset"):
        classify(["INSERT INTO outputs SELECT b.height FROM blocks b, utxoset u WHERE u.blockheight = b.height"], {"utxoset"})
    with pytest.raises(FilterError, match="trigger"):
        classify(["CREATE TRIGGER t AFTER INSERT ON utxoset BEGIN DELETE FROM blocks; END"], {"utxoset"})


@pytest.mark.parametrize("value, expected", [(None, {"utxoset"}), ("none", set()), (" UTXOSET ", {"utxoset"})])
def test_filter_option_values(value, expected):
    assert parse_filter(value) == expected


def test_filtering_a_table_that_holds_state_is_refused(make_node, traces):
    node = make_node(pibackup_filter_tables="utxoset,channels")
    node.start(traces["A"][:9])
    assert "'channels' cannot be filtered" in node.plugin.log_text()
    with pytest.raises(Halted):
        node.call(traces["A"][9])


def test_filter_read_violation_halts_the_node_before_commit(make_node, traces):
    recs = traces["A"]
    node = make_node()
    node.start(recs[:9])
    v = node.live.version()
    bad = Record(
        0,
        False,
        v + 1,
        (
            "INSERT INTO vars (name, intval) SELECT 'x', count(*) FROM utxoset",
            f"UPDATE vars SET intval = intval + 1 WHERE name = 'data_version' AND intval = {v}",
        ),
    )
    with pytest.raises(Halted):
        node.call(bad)
    assert node.live.version() == v
    assert "pibackup-filter-tables=none" in node.log_text()


def test_snapshot_keeps_the_schema_of_filtered_tables_but_not_their_rows(make_node, traces, dest, tmp_path):
    recs = driver.first_run(traces["filler-A"])
    node = make_node()
    for r in recs[:150]:
        node.commit_without_plugin(r)
    assert node.live.conn.execute("SELECT count(*) FROM utxoset").fetchone()[0] > 100
    node.start(recs[150:152])
    node.calls(recs[152:])
    node.stop()
    from pibackup.store.snapfile import expand

    snap = tmp_path / "snapshot.sqlite3"
    expand(str(next(dest.glob("gen-000001/snapshot-v*.pbsnap"))), str(snap), None)
    c = sqlite3.connect(snap)
    assert c.execute("SELECT count(*) FROM utxoset").fetchone()[0] == 0
    assert c.execute("SELECT sql FROM sqlite_master WHERE name='utxoset'").fetchone()[0].startswith("CREATE TABLE utxoset")
    out = tmp_path / "restored.sqlite3"
    r = restore_to(dest, out)
    assert r.returncode == 0, r.stderr
    assert dbcompare.backup_differences(node.live.path, out) == []
    lowest = sqlite3.connect(out).execute("SELECT MIN(height) FROM blocks").fetchone()[0]
    assert f"--rescan=-{lowest}" in r.stdout


def test_a_kill_loses_only_trailing_bulk_transactions_and_the_restart_repairs_it(make_node, traces, dest, tmp_path):
    recs = driver.first_run(traces["filler-A"])
    node = make_node()  # defaults: batch-seconds 30, so bulk calls wait in memory
    node.start(recs[:9])
    checked = 0
    i = 9
    bulk_calls = [j for j in range(20, len(recs) - 3) if is_bulk(recs[j])]
    for kill_after in sorted({bulk_calls[0], bulk_calls[len(bulk_calls) // 2], bulk_calls[-1] - 1}):
        while i <= kill_after:
            node.call(recs[i])
            i += 1
        node.kill()
        backed = restored_version(dest, tmp_path, f"k{kill_after}.sqlite3")
        live = node.live.version()
        missing = [r for r in recs if backed < r.data_version <= live]
        assert all(is_bulk(r) for r in missing), "an acknowledged critical transaction is missing"
        assert all(r.data_version <= live for r in missing)
        checked += len(missing)
        node.start(recs[i : i + 2])  # restart: the gap is detected and repaired
        i += 2
    node.stop()
    assert checked > 0, "the test never caught bulk transactions waiting in memory"
    assert "committed transactions without pibackup" in node.log_text()
    assert dbcompare.backup_differences(node.live.path, _restore(dest, tmp_path)) == []


def _restore(dest, tmp_path):
    out = tmp_path / "final.sqlite3"
    assert restore_to(dest, out).returncode == 0
    return out


def test_waiting_bulk_transactions_are_written_after_batch_seconds(make_node, traces, dest, tmp_path):
    recs = driver.first_run(traces["filler-A"])
    node = make_node(pibackup_batch_seconds=1)
    node.start(recs[:9])
    i = 9
    while not is_bulk(recs[i]):
        node.call(recs[i])
        i += 1
    node.call(recs[i])  # a bulk one, now waiting
    assert is_bulk(recs[i])
    for _ in range(600):  # the flusher writes it about a second later, with no call to prompt it
        if node.rpc("pibackup-status")["pending_bulk_bytes"] == 0:
            break
        time.sleep(0.05)
    node.kill()
    assert restored_version(dest, tmp_path, "timer.sqlite3") == recs[i].data_version


def test_waiting_bulk_transactions_go_out_with_the_next_critical_one(make_node, traces, dest, tmp_path):
    recs = driver.first_run(traces["filler-A"])
    node = make_node()
    node.start(recs[:9])
    i = 9
    while not (is_bulk(recs[i]) and not is_bulk(recs[i + 1])):
        node.call(recs[i])
        i += 1
    node.call(recs[i])  # bulk: waits
    node.call(recs[i + 1])  # critical: both durable now
    node.kill()
    assert restored_version(dest, tmp_path, "with.sqlite3") == recs[i + 1].data_version


def test_unfiltered_unbatched_restore_equals_the_live_database_exactly(make_node, traces, dest, tmp_path):
    node = make_node(pibackup_filter_tables="none", pibackup_batch_seconds=0)
    driver.run_sessions(node, traces["filler-A"])
    out = tmp_path / "r.sqlite3"
    r = restore_to(dest, out)
    assert r.returncode == 0 and "--rescan" not in r.stdout
    assert dbcompare.differences(node.live.path, out) == []
    assert cli("verify", str(dest)).returncode == 0


def test_cascades_from_blocks_into_the_filtered_utxoset_keep_the_backup_consistent(make_node, traces, dest, tmp_path):
    recs = traces["filler-A"]
    restart = next(i for i in range(1, len(recs)) if recs[i].seq == 1)
    rescan = next(i for i in range(restart, len(recs)) if any(w.startswith("DELETE FROM blocks") for w in recs[i].writes))
    node = make_node()
    driver.run_sessions(node, recs[:rescan])
    before = node.live.conn.execute("SELECT count(*) FROM utxoset").fetchone()[0]
    node.start([recs[rescan]])  # lightningd's start-up rescan: DELETE FROM blocks WHERE height > X
    after = node.live.conn.execute("SELECT count(*) FROM utxoset").fetchone()[0]
    node.stop()
    assert after < before, "the rescan's cascade removed utxoset rows in the live DB"
    out = tmp_path / "r.sqlite3"
    assert restore_to(dest, out).returncode == 0
    c = sqlite3.connect(out)
    assert c.execute("PRAGMA foreign_key_check").fetchall() == []
    assert dbcompare.backup_differences(node.live.path, out) == []


def test_a_bulk_resend_of_an_uncommitted_critical_transaction_is_synced_at_once(make_node, traces, dest, tmp_path):
    """Critical N is synced and answered, lightningd dies before committing it, restarts
    without calls before init and resends N as a bulk transaction: that rewind must be durable
    before the answer, or a power cut leaves the never-committed N as the journal's end."""
    recs = driver.first_run(traces["A"])
    node = make_node()
    node.start(recs[:9])
    j = next(i for i in range(60, len(recs)) if not is_bulk(recs[i]))
    node.calls(recs[9:j])
    node.call_then_crash_before_commit(recs[j])
    v = recs[j].data_version
    resend = Record(
        0,
        False,
        v,
        (
            "INSERT INTO blocks (height, hash, prev_hash) VALUES (999999, x'00', x'00');",
            f"UPDATE vars SET intval = intval + 1 WHERE name = 'data_version' AND intval = {v - 1}",
        ),
    )
    assert is_bulk(resend)
    node.start([])
    node.call(resend)
    node.kill()  # power cut
    out = _restore(dest, tmp_path)
    assert dbcompare.backup_differences(node.live.path, out) == []
