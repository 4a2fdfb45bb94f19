"""The zeros written ahead of a journal segment grow with the generation: a new node's first
generation has no snapshot, and with the 16 KiB floor alone a busy journal paid an extension
(a metadata commit on ext4) every few transactions."""

from __future__ import annotations

import os
import random
import sqlite3

from pibackup.modes.api import Call
from pibackup.modes.journal.writer import JournalWriter
from pibackup.store.appender import PREALLOCATE_FLOOR, PREALLOCATE_SHARE


def test_a_new_nodes_segment_gets_bigger_chunks_as_its_journal_grows(tmp_path):
    live = tmp_path / "live.sqlite3"
    schema = [
        "CREATE TABLE vars (name TEXT, val TEXT, intval INTEGER, blobval BLOB)",
        "INSERT INTO vars (name, intval) VALUES ('data_version', 1)",
        "CREATE TABLE t (id INTEGER, b BLOB)",
    ]
    with sqlite3.connect(live) as db:
        for s in schema:
            db.execute(s)
    dest = tmp_path / "dest"
    dest.mkdir()
    w = JournalWriter(
        str(dest), str(live), lambda m, lvl="info": None, segment_bytes=64 << 20, filter_tables=frozenset(),
        batch_seconds=0, batch_bytes=0, preallocate=1 << 20, compress=True,
    )
    w.start([Call(1, schema)])
    assert w.snapshot_bytes == 0 and w.writer is not None and w.writer.preallocate == PREALLOCATE_FLOOR
    rnd = random.Random(1)
    extensions = 0
    for v in range(2, 1500):
        before = w.writer.allocated
        w.write(v, [f"INSERT INTO t VALUES ({v}, X'{rnd.randbytes(1000).hex()}')"])  # random: about 1 KB a frame
        extensions += w.writer.allocated != before
    seg = w.writer
    assert seg.preallocate >= w.journal_bytes // PREALLOCATE_SHARE // 2  # grew with the journal
    # Fewer extensions than the floor alone made (one every 16 KiB of journal): their number
    # grows with the logarithm of the journal, not with the journal (about 60 against 109 here)...
    assert extensions < w.journal_bytes // PREALLOCATE_FLOOR * 2 // 3, (extensions, w.journal_bytes)
    # ...and the zeros ahead are still a small part of the backup.
    assert os.path.getsize(seg.path) - seg.size <= max(PREALLOCATE_FLOOR, w.journal_bytes // PREALLOCATE_SHARE) + 4096
    w.close()
