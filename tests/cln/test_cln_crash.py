"""The plugin as a real lightningd's important-plugin: node A paying node B is SIGKILLed at
random moments, its database thrown away and restored from the backup, and A runs on: A and
B agree on the channel's balance, every payment A saw complete is there, and A pays again."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
from pathlib import Path
from typing import Dict, Iterator, List

import pytest
from harness import PLUGIN, ROOT, Cluster, Node, open_channel, pay, wait_for
from pyln.client import RpcError

pytestmark = pytest.mark.xdist_group("cln-crash")

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
