"""A dropped destination (continue-degraded) rejoins from a copy of the healthy one's generation,
made in the background: lightningd waits only for what was appended since, never for a
snapshot of the live database."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import dbcompare
import driver
from helpers import cli
from pibackup.fanout.destinations import REJOIN_CHECK_SECONDS

BACK = re.compile(
    r"destination (\S+) is back and in step at data_version \d+ "
    r"\((gen-\d+) copied from (\S+): ([\d,]+) bytes in the background, ([\d,]+) while lightningd waited\)"
)


def restores_to_live(dest: Path, node: driver.Node, out: Path) -> None:
    r = cli("restore", str(dest), str(out))
    assert r.returncode == 0, r.stderr
    assert dbcompare.backup_differences(node.live.path, out) == []


def test_a_new_card_rejoins_from_a_copy_of_the_healthy_destination_not_from_the_live_database(traces, make_node, tmp_path):
    a, b = tmp_path / "stick" / "pibackup", tmp_path / "sd2" / "pibackup"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    recs = driver.first_run(traces["A"])
    node = make_node(
        pibackup_destination=[str(a), str(b)],
        pibackup_on_destination_failure="continue-degraded",
        pibackup_compact_ratio="0",  # one generation throughout: the copy is never outdated by a compaction
    )
    node.start(recs[:9])
    node.calls(recs[9:80])
    shutil.rmtree(b)  # the second card fails
    node.calls(recs[80:150])
    assert f"destination {b} dropped" in node.log_text()
    b.mkdir()  # a new card in its place
    time.sleep(REJOIN_CHECK_SECONDS + 0.5)  # the probe looks again only this often
    k = 150
    while f"destination {b} is back" not in node.log_text():
        assert k < len(recs) - 50, "the new card never rejoined:\n" + node.log_text()
        node.call(recs[k])  # the copy runs in the background meanwhile: lightningd goes on
        k += 1
    node.calls(recs[k : k + 50])  # and after it, on both
    log = node.log_text()
    m = BACK.search(log)
    assert m, log
    assert m.group(1) == str(b) and m.group(3) == str(a)
    background, waited = int(m.group(4).replace(",", "")), int(m.group(5).replace(",", ""))
    assert background > 0 and waited < background, m.group(0)
    # No snapshot of the live database was taken for it: the only generation started is the first.
    assert "snapshot at data_version" not in log and "taking a snapshot" not in log, log
    assert sorted(p.name for p in b.iterdir() if p.name.startswith("gen-")) == [m.group(2)]
    st = node.rpc("pibackup-status")
    assert [d.get("state") for d in st["destinations"]] == ["ok", "ok"], st
    assert st["destinations"][1]["counters"]["generations_started"] == 0, st["destinations"][1]
    node.stop()
    restores_to_live(a, node, tmp_path / "a.sqlite3")
    restores_to_live(b, node, tmp_path / "b.sqlite3")  # everything acknowledged, before and after the copy
