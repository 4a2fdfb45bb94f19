"""A routing node: A -> B -> C with the plugin on B. B is SIGKILLed while it forwards, its
database restored, and payments through it succeed again; then C force-closes while B is
down, and the restored B sees the close and gets its funds back on chain."""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Dict, Iterator, List

import pytest
from harness import PLUGIN, Cluster, Node, forget_learned_capacities, open_channel, pay, wait_for
from pyln.client import RpcError
from test_cln_crash import balances_agree, restore_db

RUNS = 2


@pytest.fixture(scope="module")
def route(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dict[str, object]]:
    base = tmp_path_factory.mktemp("cln-routing")
    cluster = Cluster(base)
    try:
        dest = base / "usb" / "pibackup"
        dest.mkdir(parents=True)
        a = cluster.node("A")
        b = cluster.node("B", {"important-plugin": str(PLUGIN), "pibackup-destination": str(dest)})
        c = cluster.node("C")
        a.fund(3_000_000)
        b.fund(3_000_000)
        open_channel(a, b, 2_000_000)
        open_channel(b, c, 2_000_000)
        cluster.mine(6)  # announcement depth: A learns of B -> C from gossip

        def known(x: Node, y: Node) -> bool:
            return any(ch["destination"] == y.id() for ch in a.rpc.listchannels(source=x.id())["channels"])

        wait_for("A to know the channel B -> C both ways", lambda: known(b, c) and known(c, b))
        yield {"cluster": cluster, "a": a, "b": b, "c": c, "dest": dest}
    finally:
        cluster.close()


def settled(x: Node, y: Node, z: Node) -> bool:
    return balances_agree(x, y) and balances_agree(y, z)


def test_routing_node_killed_while_forwarding_is_restored_and_forwards_again(route: Dict[str, object]) -> None:
    a, b, c, dest = route["a"], route["b"], route["c"], route["dest"]
    assert isinstance(a, Node) and isinstance(b, Node) and isinstance(c, Node) and isinstance(dest, Path)
    assert pay(a, c, 2_000_000, "warm-up")["status"] == "complete"
    rng = random.Random(7)
    done: List[str] = []
    for run in range(RUNS):
        stop = threading.Event()

        def payments(run: int = run, stop: threading.Event = stop) -> None:
            i = 0
            while not stop.is_set():
                try:
                    r = pay(a, c, 1_000_000 + rng.randrange(1000), f"fwd{run}-{i}")
                except (RpcError, OSError, ValueError):
                    stop.wait(0.2)  # B was down under the payment: A tries the next one
                    continue
                if r.get("status") == "complete":
                    done.append(str(r["payment_hash"]))
                i += 1

        before = len(done)
        t = threading.Thread(target=payments, daemon=True)
        t.start()
        wait_for("a few forwards", lambda before=before: len(done) >= before + 2)
        threading.Event().wait(rng.uniform(0, 0.4))
        b.kill()
        stop.set()
        restore_db(dest, b)
        b.start()
        t.join(180)
        assert not t.is_alive()
        wait_for("B to reconnect to A and C", lambda: b.channel(a)["peer_connected"] and b.channel(c)["peer_connected"])
        wait_for(f"A, B and C to agree after kill {run + 1}", lambda: settled(a, b, c))
        forwards = b.rpc.listforwards(status="settled")["forwards"]
        assert len(forwards) >= len(done), "a forward settled before the kill is missing from the restored B"
        forget_learned_capacities(a)  # payments that failed while B was down taught A's router wrong limits
        assert pay(a, c, 3_000_000, f"after-kill{run}")["status"] == "complete"
        wait_for("A, B and C to agree after paying again", lambda: settled(a, b, c))


def test_force_close_while_routing_node_is_down_is_seen_and_swept(route: Dict[str, object]) -> None:
    cluster, b, c, dest = route["cluster"], route["b"], route["c"], route["dest"]
    assert isinstance(cluster, Cluster) and isinstance(b, Node) and isinstance(c, Node) and isinstance(dest, Path)
    ours = b.channel(c)["to_us_msat"] // 1000
    wallet_before = b.confirmed_sats()
    b_id = b.id()
    b.kill()
    closed = c.rpc.close(b_id, unilateraltimeout=1)
    assert closed["type"] == "unilateral"
    close_txid = closed["txids"][-1] if "txids" in closed else closed["txid"]
    wait_for("C's commitment transaction in the mempool", lambda: cluster.chain.mempool() > 0)
    cluster.mine(1)
    restore_db(dest, b)
    b.start()

    def b_saw_close() -> bool:
        state = b.channel(c)["state"]
        return state in ("FUNDING_SPEND_SEEN", "ONCHAIN", "CLOSINGD_COMPLETE") or "ONCHAIN" in state

    wait_for("the restored B to see C's close", b_saw_close)

    def swept() -> bool:
        outs = [o for o in b.rpc.listfunds()["outputs"] if o["txid"] == close_txid and o["status"] == "confirmed"]
        return bool(outs)

    for _ in range(20):  # a block at a time until B's output from the close is in its wallet
        if swept():
            break
        cluster.mine(1)
    wait_for("B's funds from C's close in its wallet", swept)
    got = sum(o["amount_msat"] // 1000 for o in b.rpc.listfunds()["outputs"] if o["txid"] == close_txid)
    assert got > ours - 20_000, (got, ours)  # B opened B -> C: the commitment fee and anchors were its share
    assert b.confirmed_sats() >= wallet_before + got
