"""The plugin as a real lightningd's important-plugin on node A, paying node B: A SIGKILLed
at random moments, its database thrown away and restored, and A runs on (A and B agree,
every payment A saw complete is there, A pays again); emergency.recover in the backup byte
for byte lightningd's after an open and a close; another node started on A's backup refused,
the backup unchanged; and, with no database left, the backup's emergency.recover used with
`emergencyrecover` to get a channel's funds back."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Dict, Iterator, List

import pytest
from harness import PLUGIN, ROOT, Cluster, Node, open_channel, pay, wait_for
from pyln.client import RpcError

RUNS = 4  # kills of A, each followed by a restore of its database
CAPACITY_SATS = 2_000_000


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dict[str, object]]:
    base = tmp_path_factory.mktemp("cln-crash")
    cluster = Cluster(base)
    try:
        dest = base / "usb" / "pibackup"
        dest.mkdir(parents=True)
        a = cluster.node("A", {"important-plugin": str(PLUGIN), "pibackup-destination": str(dest)})
        b = cluster.node("B")
        a.fund(3_000_000)
        open_channel(a, b, CAPACITY_SATS)
        yield {"cluster": cluster, "a": a, "b": b, "dest": dest}
    finally:
        cluster.close()


def restore_db(dest: Path, node: Node) -> str:
    """Throw the node's database away and restore it from the backup with the plain restore."""
    for suffix in ("", "-journal", "-wal", "-shm"):
        p = Path(str(node.db) + suffix)
        if p.exists():
            p.unlink()
    out = subprocess.run(
        [sys.executable, "-m", "pibackup", "restore", str(dest), str(node.db)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def balances_agree(a: Node, b: Node) -> bool:
    """Both sides see the same split and no HTLC is left in flight."""
    ca, cb = a.channel(b), b.channel(a)
    settled = not ca["htlcs"] and not cb["htlcs"]
    return bool(settled and ca["to_us_msat"] + cb["to_us_msat"] == ca["total_msat"] == cb["total_msat"])


def test_sigkill_at_random_moments_then_restore_agrees_and_pays(pair: Dict[str, object]) -> None:
    a, b, dest = pair["a"], pair["b"], pair["dest"]
    assert isinstance(a, Node) and isinstance(b, Node) and isinstance(dest, Path)
    rng = random.Random(20261207)
    completed: List[str] = []
    for run in range(RUNS):
        stop = threading.Event()

        def payments(run: int = run, stop: threading.Event = stop) -> None:
            i = 0
            while not stop.is_set():
                try:
                    r = pay(a, b, 1_000_000 + rng.randrange(1000), f"run{run}-{i}")
                except (RpcError, OSError, ValueError):
                    return  # A was killed under the call
                if r.get("status") == "complete":
                    completed.append(str(r["payment_hash"]))
                i += 1

        before = len(completed)
        t = threading.Thread(target=payments, daemon=True)
        t.start()
        # A random moment inside the stream of payments: after a few have gone through, with
        # others in flight (the kill lands in a hook call, an HTLC exchange, or between them).
        wait_for("a few payments", lambda before=before: len(completed) >= before + 2)
        threading.Event().wait(rng.uniform(0, 0.5))
        a.kill()
        stop.set()
        t.join(60)
        assert not t.is_alive()
        restore_db(dest, a)
        a.start()
        wait_for("A and B to reconnect", lambda: a.channel(b)["peer_connected"] and b.channel(a)["peer_connected"])
        wait_for(f"A and B to agree on the balance after kill {run + 1}", lambda: balances_agree(a, b))
        # Nothing acknowledged is lost: every payment A reported complete is complete in the restored node.
        for h in completed:
            sent = a.rpc.listsendpays(payment_hash=h)["payments"]
            assert any(p["status"] == "complete" for p in sent), f"payment {h} completed before the kill is missing"
        assert pay(a, b, 500_000, f"after-run{run}")["status"] == "complete"
        wait_for("A and B to agree after paying again", lambda: balances_agree(a, b))
    assert len(completed) >= 2 * RUNS


def copy_in_step(dest: Path, a: Node) -> bytes:
    """Wait until the backup's emergency.recover is byte for byte lightningd's; its bytes."""

    def same() -> bytes:
        live = (a.net / "emergency.recover").read_bytes()
        return live if (dest / "emergency.recover").read_bytes() == live else b""

    return bytes(wait_for("the backup's emergency.recover to equal lightningd's", same))


def test_emergency_recover_in_the_backup_is_lightningds_after_an_open_and_a_close(pair: Dict[str, object]) -> None:
    cluster, a, b, dest = pair["cluster"], pair["a"], pair["b"], pair["dest"]
    assert isinstance(cluster, Cluster) and isinstance(a, Node) and isinstance(b, Node) and isinstance(dest, Path)
    first = copy_in_step(dest, a)
    open_channel(a, b, 300_000)  # a second channel: lightningd rewrites the file
    opened = copy_in_step(dest, a)
    assert opened != first
    second = a.channel(b)
    a.rpc.close(second["channel_id"])
    wait_for("the mutual close in the mempool", lambda: cluster.chain.mempool() > 0)
    cluster.mine(1)
    wait_for("the second channel closed", lambda: a.channel(b)["state"] in ("ONCHAIN", "CLOSINGD_COMPLETE", "CLOSED"))
    cluster.mine(100)  # lightningd forgets a closed channel after 100 blocks, and rewrites the file then

    def rewritten() -> bool:
        return (a.net / "emergency.recover").read_bytes() != opened

    wait_for("lightningd to rewrite emergency.recover after the close", rewritten)
    assert copy_in_step(dest, a) != opened


def test_another_node_started_on_this_backup_is_refused_and_it_stays_byte_for_byte(pair: Dict[str, object]) -> None:
    cluster, a, b, dest = pair["cluster"], pair["a"], pair["b"], pair["dest"]
    assert isinstance(cluster, Cluster) and isinstance(a, Node) and isinstance(b, Node) and isinstance(dest, Path)
    a_id = a.id()
    a.kill()
    before = files(dest)
    other = cluster.node("other", {"important-plugin": str(PLUGIN), "pibackup-destination": str(dest)}, start=False)
    other.start(wait=False)
    assert other.exit_code() != 0, "lightningd ran on with its backup plugin refusing another node's backup"
    log = other.tail(200)
    assert a_id in log and "another node" in log, log
    assert files(dest) == before
    a.start()
    wait_for("A and B to reconnect", lambda: a.channel(b)["peer_connected"] and b.channel(a)["peer_connected"])


def files(root: Path) -> Dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_with_no_database_emergency_recover_from_the_backup_gets_the_channel_funds_back(pair: Dict[str, object]) -> None:
    """The last resort (docs/guide/recovery.md): a fresh lightning-dir with the node's hsm_secret
    and the backup's emergency.recover, pibackup on a new empty directory, `emergencyrecover`:
    a stub for every channel, the peer closes, and A's funds come back on chain.

    The peer here is a channel that never carried a payment: a Core Lightning v26.06.6 peer
    answers the recovering node's reestablish with a close only then (on the used channel to B
    it stays in CHANNELD_NORMAL; the guide says to ask the peer's operator)."""
    cluster, a, b, dest = pair["cluster"], pair["a"], pair["b"], pair["dest"]
    assert isinstance(cluster, Cluster) and isinstance(a, Node) and isinstance(b, Node) and isinstance(dest, Path)
    c = cluster.node("C")
    open_channel(a, c, 400_000)
    in_channel = a.channel(c)["to_us_msat"] // 1000
    copy_in_step(dest, a)  # the backup's copy holds both channels now
    secret = (a.net / "hsm_secret").read_bytes()
    a.kill()
    shutil.rmtree(a.dir)  # the database is gone and no backup of it can be used
    a.net.mkdir(parents=True)
    (a.net / "hsm_secret").write_bytes(secret)
    shutil.copyfile(dest / "emergency.recover", a.net / "emergency.recover")
    fresh = dest.parent / "pibackup-new"
    fresh.mkdir()
    a.options["pibackup-destination"] = str(fresh)  # the old backup cannot take this new database
    a.start()
    stubs = a.rpc.call("emergencyrecover")["stubs"]
    assert len(stubs) == 2, stubs
    wait_for("C to close the channel A lost", lambda: cluster.chain.mempool() > 0)
    cluster.mine(1)

    def from_the_channel() -> bool:
        # The output of C's close that is A's: the channel's balance less the closing fees
        # (A opened the channel, so they were A's share). A's fresh wallet may or may not
        # find its older outputs again, so the output is looked for, not the wallet's total.
        outs = a.rpc.listfunds()["outputs"]
        return any(o["status"] == "confirmed" and in_channel - 20_000 < o["amount_msat"] // 1000 <= in_channel for o in outs)

    for _ in range(20):  # a block at a time until A's output from C's close is in its wallet
        if from_the_channel():
            break
        cluster.mine(1)
    wait_for("A's funds from C's close in its wallet", from_the_channel)
