"""A real Core Lightning for the tests: a shared fake chain (../shared/cln/fakechain.py) and
lightningd nodes run as subprocesses on free 127.0.0.1 ports, driven through pyln-client.

Where the pieces are: lightningd unpacked by `make setup` into `.cln/` of the checkout (or
PIBACKUP_CLN_BIN, the directory holding lightningd), fakechain.py in ../shared/cln/ (or
PIBACKUP_CLN_SHARED). Missing pieces skip the tests, except in CI (CI=true), where they fail.
Every node is started in its own process group and the whole group is SIGKILLed when the
test's cluster ends, whatever happened. A module's tests share one cluster (a module-scoped
fixture) and expect to run in the file's order; pytest-xdist may still give a module's tests
to two workers, each then building its own cluster: slower, never wrong.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pytest
from pyln.client import LightningRpc, RpcError

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("PIBACKUP_CLN_SHARED", ROOT.parent / "shared" / "cln"))
BIN = Path(os.environ.get("PIBACKUP_CLN_BIN", ROOT / ".cln" / "usr" / "local" / "bin"))
PLUGIN = ROOT / "pibackup.py"
VENV_BIN = Path(sys.executable).parent  # pibackup.py's `env python3` must find pyln-client
TIMEOUT = 90.0  # a condition that takes longer than this is a failure, not slowness


def require_cln() -> None:
    """Skip (or, in CI, fail) when the real lightningd or fakechain.py is not there."""
    missing = [str(p) for p in (BIN / "lightningd", SHARED / "fakechain.py") if not p.exists()]
    if not missing:
        return
    why = (
        f"real Core Lightning not found ({', '.join(missing)}): run `make setup` with ../shared/cln beside the "
        "checkout, or set PIBACKUP_CLN_BIN / PIBACKUP_CLN_SHARED"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(why)
    pytest.skip(why)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, check: Callable[[], Any], timeout: float = TIMEOUT) -> Any:
    """Poll `check` until it returns something true; its value. Fails naming `what`."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (RpcError, OSError, ValueError) as e:  # a node still starting, a file still being written
            last = e
        else:
            if last:
                return last
        time.sleep(delay)
        delay = min(0.5, delay * 1.5)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


class Chain:
    """The fake chain's directory, shared by every node of a cluster."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.run("init", "--blocks", "101")

    def run(self, *args: str) -> Dict[str, Any]:
        out = subprocess.run(
            [sys.executable, str(SHARED / "fakechain.py"), "--dir", str(self.path), *args],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        return json.loads(out.stdout)

    def mine(self, n: int = 1) -> int:
        return int(self.run("mine", str(n))["height"])

    def fund(self, address: str, sats: int) -> None:
        self.run("fund", address, str(sats), "--blocks", "1")

    def height(self) -> int:
        return int(self.run("info")["height"])

    def mempool(self) -> int:
        return int(self.run("info")["mempool"])


class Node:
    """One lightningd: its lightning-dir, port and options; started and stopped by the test."""

    def __init__(self, name: str, base: Path, chain: Chain, options: Optional[Dict[str, Any]] = None) -> None:
        self.name = name
        self.dir = base / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.chain = chain
        self.port = free_port()
        self.options: Dict[str, Any] = dict(options or {})
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self._rpc: Optional[LightningRpc] = None
        self.starts = 0

    @property
    def net(self) -> Path:
        return self.dir / "regtest"

    @property
    def db(self) -> Path:
        return self.net / "lightningd.sqlite3"

    @property
    def log(self) -> Path:
        return self.dir / "log"

    def command(self) -> List[str]:
        cmd = [
            str(BIN / "lightningd"),
            f"--lightning-dir={self.dir}",
            "--network=regtest",
            "--disable-plugin=bcli",
            f"--plugin={SHARED / 'fakechain.py'}",
            f"--fakechain-dir={self.chain.path}",
            f"--addr=127.0.0.1:{self.port}",
            "--disable-dns",
            f"--log-file={self.log}",
            "--log-level=debug",
            "--developer",
            "--dev-bitcoind-poll=1",
            "--dev-fast-gossip",
            "--funding-confirms=1",
        ]
        for k, v in self.options.items():
            for one in v if isinstance(v, list) else [v]:
                cmd.append(f"--{k}" if one is None else f"--{k}={one}")
        return cmd

    def start(self, wait: bool = True) -> None:
        assert self.proc is None, f"{self.name} is already running"
        env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}")
        with open(self.dir / "stderr", "ab") as err:
            self.proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env, start_new_session=True
            )
        self.starts += 1
        self._rpc = None
        if wait:
            self.wait_started()

    def wait_started(self) -> None:
        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"{self.name}'s lightningd exited with {self.proc.returncode}:\n{self.tail()}")
            return bool(self.rpc.getinfo()["id"])

        wait_for(f"{self.name} to answer getinfo", up)
        # The RPC answers before connectd listens for peers: a connect in between is refused.
        wait_for(f"{self.name} to listen on 127.0.0.1:{self.port}", self.listening)

    def listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2):
                return True
        except OSError:
            return False

    @property
    def rpc(self) -> LightningRpc:
        if self._rpc is None:
            self._rpc = LightningRpc(str(self.net / "lightning-rpc"))
        return self._rpc

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL lightningd with everything it started (subdaemons, plugins): a power cut."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._wait_group_gone(self.proc.pid)
        self.proc = None
        self._rpc = None

    def _wait_group_gone(self, pgid: int) -> None:
        def gone() -> bool:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                return True
            return False

        wait_for(f"{self.name}'s processes to go", gone, 30)

    def stop(self) -> None:
        """A clean `stop`, then whatever is left of the group killed."""
        if self.proc is None:
            return
        try:
            self.rpc.stop()
        except (RpcError, OSError, ValueError):
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        self.kill()

    def exit_code(self, timeout: float = TIMEOUT) -> int:
        """Wait for lightningd to exit by itself (a refusal at start); its status."""
        assert self.proc is not None
        code = self.proc.wait(timeout=timeout)
        self._wait_group_gone(self.proc.pid)
        self.proc = None
        self._rpc = None
        return code

    def tail(self, lines: int = 40) -> str:
        text = ""
        for f in (self.log, self.dir / "stderr"):
            if f.exists():
                text += "".join(f.read_text(errors="replace").splitlines(True)[-lines:])
        return text

    # --- what the tests do with a node ------------------------------------------------
    def id(self) -> str:
        return str(self.rpc.getinfo()["id"])

    def fund(self, sats: int) -> None:
        before = self.confirmed_sats()
        addr = self.rpc.newaddr()
        self.chain.fund(addr.get("p2tr") or addr["bech32"], sats)
        wait_for(f"{self.name}'s funds", lambda: self.confirmed_sats() >= before + sats)

    def confirmed_sats(self) -> int:
        return sum(o["amount_msat"] // 1000 for o in self.rpc.listfunds()["outputs"] if o["status"] == "confirmed")

    def channels(self) -> List[Dict[str, Any]]:
        return list(self.rpc.listpeerchannels()["channels"])

    def channel(self, peer: Node) -> Dict[str, Any]:
        chans = [c for c in self.rpc.listpeerchannels(peer.id())["channels"]]
        assert chans, f"{self.name} has no channel with {peer.name}"
        return dict(chans[-1])

    def connect(self, peer: Node) -> None:
        self.rpc.connect(peer.id(), "127.0.0.1", peer.port)

    def wait_normal(self, peer: Node) -> Dict[str, Any]:
        def normal() -> Any:
            c = self.channel(peer)
            return c if c["state"] == "CHANNELD_NORMAL" and c.get("peer_connected") else None

        return dict(wait_for(f"{self.name}'s channel with {peer.name} in CHANNELD_NORMAL", normal))

    def wait_height(self, height: int) -> None:
        wait_for(f"{self.name} at height {height}", lambda: self.rpc.getinfo()["blockheight"] >= height)


def open_channel(a: Node, b: Node, sats: int, push_msat: int = 0) -> None:
    """A funded channel a -> b, confirmed, CHANNELD_NORMAL on both sides."""
    a.connect(b)
    args: Dict[str, Any] = {"id": b.id(), "amount": sats}
    if push_msat:
        args["push_msat"] = push_msat
    a.rpc.call("fundchannel", args)
    wait_for("the funding transaction in the mempool", lambda: a.chain.mempool() > 0)
    height = a.chain.mine(6)
    for n in (a, b):
        n.wait_height(height)
    a.wait_normal(b)
    b.wait_normal(a)


def forget_learned_capacities(node: Node) -> None:
    """Drop what the payer's router (askrene's `xpay` layer) learned from payments that failed
    while a hop was down: time would age it out; a test does not wait for that."""
    try:
        node.rpc.call("askrene-age", {"layer": "xpay", "cutoff": int(time.time()) + 1})
    except RpcError:
        pass  # no such layer yet: nothing learned


def pay(payer: Node, payee: Node, msat: int, label: str) -> Dict[str, Any]:
    inv = payee.rpc.invoice(msat, label, "test payment")["bolt11"]
    return dict(payer.rpc.pay(inv))


class Cluster:
    """A chain and the nodes on it; `close()` kills every node, whatever state it is in."""

    def __init__(self, base: Path) -> None:
        require_cln()
        base.mkdir(parents=True, exist_ok=True)
        self.base = base
        self.chain = Chain(base / "chain")
        self.nodes: List[Node] = []

    def node(self, name: str, options: Optional[Dict[str, Any]] = None, start: bool = True) -> Node:
        n = Node(name, self.base, self.chain, options)
        self.nodes.append(n)
        if start:
            n.start()
        return n

    def mine(self, n: int = 1) -> None:
        """Mine, and wait until every running node has seen the new tip."""
        height = self.chain.mine(n)
        for node in self.nodes:
            if node.running():
                node.wait_height(height)

    def close(self) -> None:
        for n in self.nodes:
            n.kill()
