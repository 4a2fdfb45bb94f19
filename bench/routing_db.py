#!/usr/bin/env python3
"""A Core Lightning database shaped like a routing node's, of any size, for the large-database
benchmarks: `bench/routing_db.py OUT.sqlite3 --mb 2048`.

It starts from trace A's real database (Core Lightning v26.06.6's schema and its own rows: vars,
the node, the chain it saw), so every table, index and constraint is the real one, and adds what
years of routing leave behind. What a routing node's database holds, taken from the statements
lightningd writes (the recordings show each one's shape):
- per forward: a `forwards` row, and an incoming and an outgoing `channel_htlcs` row. Once an
  HTLC is resolved lightningd sets its onion, payment key, shared secret and failure messages to
  NULL, so what stays is its payment hash (32 random bytes) and integers; a few hundred recent
  ones are still in flight with their 1366-byte onion;
- per settled forward: two `channel_moves` rows (the bookkeeper's credit and debit);
- about 60 % of forwards fail (a routing node's usual share), with a failcode;
- invoices it issued (bolt11 text of about 280 characters, a description) and payments it made
  (bolt11, route nodes and channels, path secrets, the preimage);
- one `blocks` row per block (two 32-byte hashes), and a `utxoset` of P2WSH outputs, as
  lightningd keeps for checking gossip;
- a few dozen peers and channels, cloned from trace A's channel with fresh keys.
Blobs are random bytes of the real lengths (hashes, keys, signatures and onions are), so the
file compresses as a real one does, not better.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

TRACES = Path(os.environ.get("PIBACKUP_TRACES", Path(__file__).resolve().parents[2] / "shared" / "traces"))
BECH32 = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
PEERS = 40
FAILED_SHARE = 0.6
IN_FLIGHT = 300  # HTLCs still carrying their onion
BATCH = 20_000  # forwards per transaction


class Maker:
    """Rows with the real tables' shapes; `rng` makes every run with one seed the same file."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.now = 1_700_000_000

    def blob(self, n: int) -> bytes:
        return self.rng.randbytes(n)

    def bolt11(self) -> str:
        return "lnbc" + "".join(self.rng.choice(BECH32) for _ in range(276))


def clone_channels(conn: sqlite3.Connection, m: Maker) -> List[Tuple[int, int]]:
    """(channel id, scid) of PEERS new channels, each to a new peer, copies of trace A's
    channel with fresh ids, keys and signatures of the same lengths."""
    conn.row_factory = sqlite3.Row
    template = conn.execute("SELECT * FROM channels ORDER BY id LIMIT 1").fetchone()
    peer = conn.execute("SELECT * FROM peers ORDER BY id LIMIT 1").fetchone()
    conn.row_factory = None
    if template is None or peer is None:
        sys.exit("the base database has no channel to copy")
    top_peer = conn.execute("SELECT max(id) FROM peers").fetchone()[0]
    top_chan = conn.execute("SELECT max(id) FROM channels").fetchone()[0]
    made = []
    for k in range(1, PEERS + 1):
        p: Dict[str, Any] = dict(peer)
        p["id"] = top_peer + k
        p["node_id"] = b"\x02" + m.blob(32)
        conn.execute(f"INSERT INTO peers ({','.join(p)}) VALUES ({','.join('?' * len(p))})", list(p.values()))
        c: Dict[str, Any] = {key: (m.blob(len(v)) if isinstance(v, bytes) else v) for key, v in dict(template).items()}
        scid = (700_000 + k) << 40 | (k << 16) | 1
        c.update(id=top_chan + k, peer_id=p["id"], scid=scid, short_channel_id=f"{700_000 + k}x{k}x1")
        conn.execute(f"INSERT INTO channels ({','.join(c)}) VALUES ({','.join('?' * len(c))})", list(c.values()))
        made.append((c["id"], scid))
    return made


def add_forwards(conn: sqlite3.Connection, m: Maker, channels: List[Tuple[int, int]], first: int, count: int) -> None:
    rng = m.rng
    forwards, htlcs, moves = [], [], []
    htlc_id = conn.execute("SELECT coalesce(max(id), 0) FROM channel_htlcs").fetchone()[0]
    move_id = conn.execute("SELECT coalesce(max(id), 0) FROM channel_moves").fetchone()[0]
    for i in range(first, first + count):
        (cin, scid_in), (cout, scid_out) = rng.sample(channels, 2)
        amount = rng.randint(1_000, 5_000_000_000)
        fee = 1_000 + amount // 1_000_000 * rng.randint(1, 500)
        failed = rng.random() < FAILED_SHARE
        m.now += rng.randint(1, 20)
        phash = m.blob(32)
        forwards.append(
            (
                scid_in,
                i,
                scid_out,
                i,
                amount + fee,
                amount,
                2 if failed else 1,
                m.now,
                m.now + rng.randint(1, 30),
                0x1007 if failed else None,
                1,
                i,
            )
        )
        for direction, chan, msat, origin in ((1, cin, amount + fee, None), (0, cout, amount, htlc_id + 1)):
            htlc_id += 1
            flight = i >= first + count - IN_FLIGHT // 2 and not failed
            htlcs.append(
                (
                    htlc_id,
                    chan,
                    i,
                    direction,
                    origin,
                    msat,
                    800_000 + i % 1000,
                    phash,
                    None,
                    m.blob(1366) if flight else None,
                    None,
                    0,
                    19 if failed else 9,
                    None,
                    m.now,
                    None,
                    None,
                    None,
                    None,
                    0,
                    None,
                    0,
                    fee if direction == 1 else 0,
                    htlc_id,
                )
            )
        if not failed:
            for chan, credit in ((cin, amount + fee), (cout, -amount)):
                move_id += 1
                moves.append((move_id, chan, None, 1 << 7, credit, m.now, phash, None, None, fee if credit > 0 else 0))
    conn.executemany("INSERT INTO forwards VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", forwards)
    conn.executemany("INSERT INTO channel_htlcs VALUES (" + ",".join("?" * 24) + ")", htlcs)
    conn.executemany("INSERT INTO channel_moves VALUES (?,?,?,?,?,?,?,?,?,?)", moves)


def add_invoices_payments(conn: sqlite3.Connection, m: Maker, first: int, count: int) -> None:
    rng = m.rng
    invoices, payments = [], []
    for i in range(first, first + count):
        m.now += rng.randint(60, 3600)
        invoices.append(
            (
                i,
                1,
                rng.randint(1, 10**9),
                m.blob(32),
                m.blob(32),
                f"routing-inv-{i}",
                m.now + 3600,
                i,
                None,
                m.now,
                m.bolt11(),
                "coffee " + str(i),
                b"",
                None,
                i,
                None,
                None,
            )
        )
        hops = rng.randint(1, 5)
        payments.append(
            (
                i,
                m.now,
                2,
                m.blob(32),
                b"\x03" + m.blob(32),
                rng.randint(1, 10**9),
                m.blob(32),
                m.blob(32 * hops),
                m.blob(33 * hops),
                m.blob(8 * hops),
                None,
                None,
                None,
                None,
                None,
                None,
                rng.randint(1, 10**9),
                None,
                "payment " + str(i),
                None,
                m.bolt11(),
                rng.randint(1, 10**9),
                0,
                0,
                None,
                None,
                m.now + 5,
                None,
                None,
                i,
            )
        )
    top_inv = conn.execute("SELECT coalesce(max(id), 0) FROM invoices").fetchone()[0]
    top_pay = conn.execute("SELECT coalesce(max(id), 0) FROM payments").fetchone()[0]
    conn.executemany(
        "INSERT INTO invoices VALUES (" + ",".join("?" * 17) + ")",
        [(r[0] + top_inv, *r[1:7], r[7] + top_inv, *r[8:14], r[14] + top_inv, *r[15:]) for r in invoices],
    )
    conn.executemany("INSERT INTO payments VALUES (" + ",".join("?" * 30) + ")", [(r[0] + top_pay, *r[1:]) for r in payments])


def add_blocks(conn: sqlite3.Connection, m: Maker, count: int) -> None:
    top = conn.execute("SELECT coalesce(max(height), 0) FROM blocks").fetchone()[0]
    blocks = [(top + k, m.blob(32), m.blob(32)) for k in range(1, count + 1)]
    conn.executemany("INSERT INTO blocks VALUES (?,?,?)", blocks)
    utxos = []
    for height, _, _ in blocks:
        for n in range(m.rng.randint(0, 6)):
            utxos.append((m.blob(32), n, height, None, m.rng.randint(1, 3000), b"\x00\x20" + m.blob(32), m.rng.randint(20_000, 10**8)))
    conn.executemany("INSERT INTO utxoset VALUES (?,?,?,?,?,?,?)", utxos)


def generate(out: Path, megabytes: int, seed: int = 1, progress: bool = True) -> Dict[str, int]:
    """Write OUT, about `megabytes` MiB; returns the rows added per table."""
    base = TRACES / "A.sqlite3"
    if not base.exists():
        sys.exit(f"{base} not found: set PIBACKUP_TRACES to the recordings' directory")
    shutil.copyfile(base, out)
    conn = sqlite3.connect(out, isolation_level=None)
    conn.execute("PRAGMA journal_mode=OFF")  # generating, not running: lightningd's own settings return below
    conn.execute("PRAGMA synchronous=OFF")
    m = Maker(seed)
    conn.execute("BEGIN")
    channels = clone_channels(conn, m)
    conn.execute("COMMIT")
    target = megabytes * 1024 * 1024
    done = {"forwards": 0, "invoices": 0, "blocks": 0}
    started = last_report = time.monotonic()
    while out.stat().st_size < target:
        conn.execute("BEGIN")
        add_forwards(conn, m, channels, done["forwards"], BATCH)
        add_invoices_payments(conn, m, done["invoices"] + 1, BATCH // 20)  # a routing node forwards far more than it pays
        add_blocks(conn, m, BATCH // 40)
        conn.execute("COMMIT")
        done["forwards"] += BATCH
        done["invoices"] += BATCH // 20
        done["blocks"] += BATCH // 40
        if progress and time.monotonic() - last_report > 10:
            last_report = time.monotonic()
            print(f"  {out.stat().st_size / 2**20:.0f} MiB of {megabytes} ({last_report - started:.0f} s)", file=sys.stderr)
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.close()
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--mb", type=int, default=2048, help="size to reach, in MiB (default 2048)")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    t = time.monotonic()
    done = generate(a.out, a.mb, a.seed)
    print(f"{a.out}: {a.out.stat().st_size / 2**20:.0f} MiB in {time.monotonic() - t:.0f} s; added {done}")


if __name__ == "__main__":
    main()
