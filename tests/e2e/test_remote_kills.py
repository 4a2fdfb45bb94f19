"""The Pi dies: the plugin SIGKILLed at random points while a remote copy is in step, and the
local destination thrown away. The remote copy alone restores to exactly the state
lightningd had at some data_version (or that plus the transaction in flight, which
lightningd was about to commit), and everything lightningd committed after it is chain
bookkeeping: no critical transaction is lost."""

from __future__ import annotations

import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import List

from test_remote import receiver_pids, remote_options, wait_in_step

import dbcompare
import driver
from helpers import restore_to
from pibackup.rules.filter import DEFAULT_FILTER, classify

LONG_RUN_KILLS = 200  # make test-long; make test: 10


def kills() -> int:
    raw = os.environ.get("PIBACKUP_KILL_POINTS")
    return 10 if raw is None else min(LONG_RUN_KILLS, max(10, int(raw)))


def state_at(records: List[driver.Record], path: Path) -> Path:
    db = driver.LiveDB(path)
    for r in records:
        db.commit(r.writes)
    db.close()
    return path


def test_sigkill_the_pi_dies_and_the_remote_alone_holds_every_critical_transaction(sshd, traces, make_node, tmp_path):
    recs = driver.first_run(traces["A"])
    early = [r for r in recs if r.pre_init]
    rng = random.Random(f"remote-kills-{kills()}")
    ahead = behind_bulk = 0
    for n in range(kills()):
        round_dir = tmp_path / f"kill{n}"
        dest = round_dir / "usb"
        dest.mkdir(parents=True)
        remote = round_dir / "remote"
        node = make_node(
            **{"pibackup-destination": str(dest), "pibackup-compact-ratio": "0"},
            **remote_options(sshd, remote, pibackup_remote_on_failure="halt"),
        )
        node.start(early)
        wait_in_step(node)
        k = rng.randrange(len(early) + 1, len(recs))
        committed = list(early)
        for r in recs[len(early) : k]:
            node.call(r)
            committed.append(r)
        in_flight = recs[k]
        if node.call_and_kill(in_flight, rng.uniform(0.0, 0.01)):
            committed.append(in_flight)
        shutil.rmtree(dest)  # the Pi and its stick are gone
        deadline = time.monotonic() + 30
        while receiver_pids(remote) and time.monotonic() < deadline:
            time.sleep(0.05)  # the receiver finishes what reached it, then sees the session end
        assert not receiver_pids(remote), "the receiver must end with its session"

        out = round_dir / "restored.sqlite3"
        r = restore_to(remote, out)
        assert r.returncode == 0, r.stdout + r.stderr
        version = int(re.search(r"at data_version (\d+)", r.stdout).group(1))  # type: ignore[union-attr]
        held = [c for c in committed if c.data_version <= version]
        reference = state_at(held, round_dir / "reference.sqlite3")
        if dbcompare.backup_differences(reference, out, ("utxoset",)) != []:
            # One ahead: the transaction in flight, synced remotely, never answered.
            assert in_flight not in committed and in_flight.data_version == version, r.stdout
            ahead_ref = state_at(held + [in_flight], round_dir / "ahead.sqlite3")
            assert dbcompare.backup_differences(ahead_ref, out, ("utxoset",)) == [], f"kill {n}: not a state lightningd had"
            ahead += 1
        lost = [c for c in committed if c.data_version > version]
        for c in lost:
            assert not classify(c.writes, DEFAULT_FILTER).critical, f"kill {n}: critical data_version {c.data_version} lost"
        behind_bulk += bool(lost)
    print(f"{kills()} kills: the remote alone held every critical transaction ({ahead} one ahead, {behind_bulk} behind by bulk)")
