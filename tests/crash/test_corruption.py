"""Random corruption of a real backup directory: bit flips, truncations
and appended garbage over journal segments, snapshots and the marker. `verify` must notice
every one; `restore` must never produce a wrong database silently: it fails, or it stops at
the last good transaction and says so, and what it restores is exactly the state the node
had at that data_version.

The one thing no log format can notice (FORMAT.md) is a cut exactly between two frames of
the newest segment: that is a shorter valid journal. Those cases are counted apart, and
their restore must still be an exact earlier state.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

import driver
from pibackup.errors import PibackupError
from pibackup.modes.journal.restore import restore, verify
from pibackup.store.reader import scan_segment
from pibackup.store.segment import HEADER_SIZE

N = int(os.environ.get("PIBACKUP_CORRUPTIONS", "400"))  # make test-long: 3000


def content_digest(path: Path, skip_rows: Tuple[str, ...] = ("utxoset",)) -> str:
    """Schema and rows of every table (rows of skipped tables left out), order-independent."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        h = hashlib.sha256()
        for row in sorted(conn.execute("SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")):
            h.update(repr(row).encode())
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")]
        for t in sorted(tables):
            if t in skip_rows:
                continue
            rows = sorted(repr(r) for r in conn.execute(f'SELECT * FROM "{t}"'))
            h.update(t.encode() + b"\0" + "\n".join(rows).encode())
        return h.hexdigest()
    finally:
        conn.close()


class Backup:
    """A real backup of the first 300 calls of trace A: generation 1 from an empty database
    in several segments, then a gap, and generation 2 from a snapshot."""

    def __init__(self, root: Path, records: List[driver.Record]):
        self.dest = root / "pristine"
        self.dest.mkdir(parents=True)
        recs = driver.first_run(records)[:300]
        early = [r for r in recs if r.pre_init]
        opts = {"pibackup-destination": str(self.dest), "pibackup-segment-size": "64K", "pibackup-compact-ratio": "0"}
        node = driver.Node(root / "node", opts)
        node.start(early)
        node.calls(recs[len(early) : 200])
        node.stop()
        node.commit_without_plugin(recs[200])  # lightningd ran without the plugin once
        node.start([])
        node.calls(recs[201:])
        node.stop()
        node.live.close()
        # The node's state at every data_version, from the transactions it committed.
        self.states: Dict[int, str] = {}
        ref = driver.LiveDB(root / "reference.sqlite3")
        for r in recs:
            ref.commit(r.writes)
            self.states[r.data_version] = content_digest(ref.path)
        ref.close()
        self.files = sorted(p for p in self.dest.rglob("*") if p.is_file())
        self.newest_segment = sorted(self.dest.glob("gen-*/seg-*.pbj"))[-1]
        # Frame boundaries of each generation's last segment: a cut there leaves that
        # generation a valid shorter journal (of the newest: the one case no format can
        # notice; of an older one: nothing says where it ended either).
        self.last_segments = [sorted(g.glob("seg-*.pbj"))[-1] for g in sorted(self.dest.glob("gen-*"))]
        self.boundaries = {
            p: {HEADER_SIZE} | {f.offset for f in scan_segment(str(p)).frames} for p in self.last_segments
        }
        self.valid_length = {p: scan_segment(str(p)).valid_length for p in self.dest.glob("gen-*/seg-*.pbj")}
        self.report = verify(str(self.dest)).lines
        out = root / "pristine.sqlite3"
        self.outcome = restore(str(self.dest), str(out))
        assert content_digest(out) == self.states[self.outcome.last_version]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, traces) -> Backup:
    return Backup(tmp_path_factory.mktemp("corruption"), traces["A"])


def corrupted_copy(b: Backup, where: Path, rng: random.Random) -> Tuple[str, Path, int]:
    """A copy of the backup (hard links) with one file damaged at random."""
    if where.exists():
        shutil.rmtree(where)
    for p in b.files:
        q = where / p.relative_to(b.dest)
        q.parent.mkdir(parents=True, exist_ok=True)
        os.link(p, q)
    victim = rng.choice(b.files)
    target = where / victim.relative_to(b.dest)
    data = bytearray(victim.read_bytes())
    target.unlink()  # never write through a hard link into the pristine copy
    what = rng.choice(["flip", "truncate", "garbage"])
    if what == "flip":
        pos = rng.randrange(len(data))
        data[pos] ^= 1 << rng.randrange(8)
    elif what == "truncate":
        pos = rng.randrange(len(data))
        data = data[:pos]
    else:
        pos = len(data)
        data += bytes(rng.randrange(1, 256) for _ in range(rng.randrange(1, 200)))
    target.write_bytes(bytes(data))
    return what, victim, pos


def test_random_corruption_is_always_noticed_and_never_restored_wrong(pristine, tmp_path):
    rng = random.Random(20261127)
    seen: Counter = Counter()
    for i in range(N):
        tree = tmp_path / "tree"
        what, victim, pos = corrupted_copy(pristine, tree, rng)
        kind = "snapshot" if victim.suffix == ".sqlite3" else ("marker" if victim.name == "PIBACKUP" else "segment")
        label = f"#{i} {what} {victim.relative_to(pristine.dest)} at {pos}"
        # A cut between frames of the newest segment leaves a valid shorter journal: the one
        # case no format can notice (FORMAT.md). A cut in a segment's unused zeros, after its
        # valid content, loses nothing.
        harmless = what == "truncate" and pos >= pristine.valid_length.get(victim, len(victim.read_bytes()) + 1)
        invisible = harmless or (what == "truncate" and pos in pristine.boundaries.get(victim, ()))

        # verify
        try:
            rep = verify(str(tree))
            damaged, lines = rep.damaged, rep.lines
        except PibackupError:
            damaged, lines = True, []
        noticed = damaged or any("note:" in line for line in lines)
        if harmless:
            seen["cut in unused zeros after a segment's content (nothing lost)"] += 1
        elif invisible:
            which = "the newest" if victim == pristine.newest_segment else "an older generation's last"
            seen[f"cut between frames of {which} segment (a valid shorter journal)"] += 1
        else:
            assert noticed, f"{label}: verify did not notice\n" + "\n".join(lines)
            seen[f"{kind} {what}: " + ("damage" if damaged else "unfinished append")] += 1

        # restore
        out = tmp_path / f"out{i}.sqlite3"
        try:
            o = restore(str(tree), str(out))
        except PibackupError:
            assert not out.exists() and not Path(str(out) + ".pibackup-tmp").exists(), label
            seen["restore refused"] += 1
            continue
        said = o.torn_tail is not None or o.damage is not None
        assert content_digest(out) == pristine.states[o.last_version], f"{label}: restore gave a wrong database"
        if harmless:
            assert o.last_version == pristine.outcome.last_version, label
        if o.last_version != pristine.outcome.last_version:
            assert said or invisible, f"{label}: restore stopped short at {o.last_version} without saying so"
        seen["restore exact" + (", and said where it stopped" if said else "")] += 1
        out.unlink()
    print(f"\n{N} corruptions of a {len(pristine.files)}-file backup:")
    for k, v in sorted(seen.items()):
        print(f"  {v:5d}  {k}")
