"""A stand-in for lightningd that drives the real pibackup.py over its stdin/stdout.

It speaks CLN's plugin JSON-RPC as lightningd v26 does (getmanifest; db_write hook calls
before init where lightningd makes them; init with options and configuration; shutdown;
stdin closed at the end) and keeps a live sqlite3 DB to which a transaction is applied
only after the plugin answered `continue`, as lightningd commits only then.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "pibackup.py"
TRACES = Path(os.environ.get("PIBACKUP_TRACES", REPO.parent / "shared" / "traces"))
LIGHTNINGD_VERSION = "v26.06.6"
TIMEOUT = 60.0


@dataclass(frozen=True)
class Record:
    """One db_write call as recorded from a real lightningd."""

    seq: int
    pre_init: bool
    data_version: int
    writes: Tuple[str, ...]


def load_trace(name: str) -> List[Record]:
    out = []
    with open(TRACES / f"{name}.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            p = r["params"]
            out.append(Record(r["seq"], r["pre_init"], p["data_version"], tuple(p["writes"])))
    return out


def first_run(records: Sequence[Record]) -> List[Record]:
    """A recording up to lightningd's first restart."""
    for i in range(1, len(records)):
        if records[i].seq == 1:
            return list(records[:i])
    return list(records)


def trace_names() -> List[str]:
    return sorted(p.stem for p in TRACES.glob("*.jsonl"))


def is_pragma_only(writes: Sequence[str]) -> bool:
    return bool(writes) and all(w.lstrip().upper().startswith("PRAGMA") for w in writes)


class LiveDB:
    """lightningd's own database: foreign keys on, one transaction per call."""

    def __init__(self, path: Path):
        self.path = path
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("PRAGMA foreign_keys = ON")

    def commit(self, writes: Sequence[str]) -> None:
        if is_pragma_only(writes):
            for w in writes:
                self.conn.execute(w)
            return
        self.conn.execute("BEGIN TRANSACTION")
        for w in writes:
            self.conn.execute(w)
        self.conn.execute("COMMIT")

    def version(self) -> Optional[int]:
        try:
            row = self.conn.execute("SELECT intval FROM vars WHERE name='data_version'").fetchone()
        except sqlite3.OperationalError:
            return None
        return None if row is None else int(row[0])

    def close(self) -> None:
        self.conn.close()


class PluginDied(Exception):
    pass


class PluginProcess:
    """The plugin as a child process, with lightningd's end of its pipes."""

    def __init__(
        self,
        cwd: Path,
        extra_env: Optional[Dict[str, str]] = None,
        argv: Optional[List[str]] = None,
        plugin: Path = PLUGIN,
        prefix: Sequence[str] = (),
        python: Optional[str] = sys.executable,
    ):
        env = dict(os.environ)
        env.update({"LIGHTNINGD_PLUGIN": "1", "LIGHTNINGD_VERSION": LIGHTNINGD_VERSION})
        env.update(extra_env or {})
        # python=None executes the plugin file itself, through its #! line, as lightningd does.
        cmd = [*prefix, *([python] if python else []), str(plugin)] + (argv or [])
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.messages: queue.Queue[Optional[Dict[str, Any]]] = queue.Queue()
        self.responses: Dict[str, Dict[str, Any]] = {}
        self.logs: List[Tuple[str, str]] = []
        self.stderr: List[bytes] = []
        self._counter = 0
        self._reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._reader.start()
        self._err = threading.Thread(target=self._read_stderr, daemon=True)
        self._err.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        buf = b""
        while True:
            chunk = self.proc.stdout.read1(65536)
            if not chunk:
                break
            buf += chunk
            while b"\n\n" in buf:
                msg, buf = buf.split(b"\n\n", 1)
                if msg.strip():
                    self.messages.put(json.loads(msg))
        self.messages.put(None)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def _next_id(self, method: str) -> str:
        self._counter += 1
        return f"cln:{method}#{self._counter}"

    def send(self, method: str, params: Any) -> str:
        rid = self._next_id(method)
        self._write({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})
        return rid

    def notify(self, method: str, params: Any) -> None:
        self._write({"jsonrpc": "2.0", "method": method, "params": params})

    def _write(self, obj: Any) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(obj).encode() + b"\n\n")
            self.proc.stdin.flush()
        except BrokenPipeError as e:
            raise PluginDied("plugin's stdin is closed") from e

    def _pump(self, timeout: float) -> bool:
        """Handle one message; False at end of stream."""
        try:
            msg = self.messages.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError("plugin did not answer in time; stderr: " + b"".join(self.stderr).decode(errors="replace"))
        if msg is None:
            self.messages.put(None)
            return False
        if "id" in msg and ("result" in msg or "error" in msg):
            self.responses[msg["id"]] = msg
        elif msg.get("method") == "log":
            p = msg["params"]
            self.logs.append((p.get("level", ""), p.get("message", "")))
        return True

    def wait_response(self, rid: str, timeout: float = TIMEOUT) -> Dict[str, Any]:
        deadline = time.monotonic() + timeout
        while rid not in self.responses:
            if not self._pump(max(0.0, deadline - time.monotonic())):
                raise PluginDied("plugin exited before answering; stderr: " + b"".join(self.stderr).decode(errors="replace"))
        return self.responses.pop(rid)

    def request(self, method: str, params: Any, timeout: float = TIMEOUT) -> Dict[str, Any]:
        return self.wait_response(self.send(method, params), timeout)

    def drain(self) -> None:
        """After the process is gone: take in everything it wrote."""
        while self._pump(TIMEOUT):
            pass

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._reader.join(TIMEOUT)
        self.drain()

    def close(self, timeout: float = TIMEOUT) -> int:
        """lightningd's end: close the plugin's stdin and wait for it to exit."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        rc = self.proc.wait(timeout)
        self._reader.join(TIMEOUT)
        self.drain()
        return rc

    def log_text(self) -> str:
        return "\n".join(f"{lvl}: {m}" for lvl, m in self.logs)


class Halted(Exception):
    """The plugin refused a db_write: lightningd stops without committing it."""


class Node:
    """A lightning-dir with a live database, and the plugin as lightningd runs it."""

    def __init__(self, root: Path, options: Optional[Dict[str, Any]] = None, network: str = "regtest"):
        self.root = root
        self.lightning_dir = root / "lightning"
        self.netdir = self.lightning_dir / network
        self.netdir.mkdir(parents=True, exist_ok=True)
        self.network = network
        self.live = LiveDB(self.netdir / "lightningd.sqlite3")
        self.options: Dict[str, Any] = dict(options or {})
        self.plugin: Optional[PluginProcess] = None
        self.all_logs: List[Tuple[str, str]] = []
        self.acknowledged = 0  # calls answered `continue` (and so committed)
        self.plugin_argv: List[str] = []  # lightningd adds --developer in developer mode
        self.plugin_path = PLUGIN  # the benchmarks also drive a bare plugin
        self.plugin_prefix: Sequence[str] = ()  # e.g. strace, for the benchmarks
        self.plugin_python: Optional[str] = sys.executable  # None: run the file by its #! line (the installed package)
        self.commit_to_live = True  # the synthetic benchmark trace is not applied to a DB
        self.latencies: List[float] = []  # db_write round trips, seconds
        self.plugin_env: Dict[str, str] = {}  # e.g. NOTIFY_SOCKET, as systemd gives lightningd

    # --- lifecycle -----------------------------------------------------------
    def start(self, early: Sequence[Record] = (), init: bool = True) -> None:
        """Start the plugin: getmanifest, the calls lightningd makes before init, init."""
        assert self.plugin is None
        self.plugin = PluginProcess(
            self.netdir,
            extra_env=self.plugin_env,
            argv=self.plugin_argv,
            plugin=self.plugin_path,
            prefix=self.plugin_prefix,
            python=self.plugin_python,
        )
        manifest = self.plugin.request("getmanifest", {"allow-deprecated-apis": False})["result"]
        assert any(h["name"] == "db_write" for h in manifest["hooks"]), manifest
        self.manifest = manifest
        for r in early:
            self.call(r)
        if init:
            self.init()

    def init(self) -> Dict[str, Any]:
        assert self.plugin is not None
        declared = {o["name"]: o for o in self.manifest["options"]}
        options = {k: v for k, v in self.options.items() if k in declared}
        for name, o in declared.items():
            if name not in options and "default" in o:
                options[name] = o["default"]
        for name, value in list(options.items()):
            if declared[name].get("multi") and not isinstance(value, list):
                options[name] = [value]  # lightningd passes a multi option's values as an array
        params = {
            "options": options,
            "configuration": {
                "lightning-dir": str(self.netdir),
                "rpc-file": "lightning-rpc",
                "startup": True,
                "network": self.network,
                "feature_set": {"init": "02aaa2", "node": "8000000002aaa2", "channel": "", "invoice": "028200"},
            },
        }
        return self.plugin.request("init", params)

    def call(self, r: Record) -> None:
        """One db_write: commit it to the live DB only if the plugin says continue."""
        assert self.plugin is not None
        t0 = time.perf_counter()
        resp = self.plugin.request("db_write", {"data_version": r.data_version, "writes": list(r.writes)})
        self.latencies.append(time.perf_counter() - t0)
        if resp.get("result") != {"result": "continue"}:
            self.halt()
            raise Halted(str(resp))
        if self.commit_to_live:
            self.live.commit(r.writes)
        self.acknowledged += 1

    def calls(self, records: Sequence[Record]) -> None:
        for r in records:
            self.call(r)

    def call_and_kill(self, r: Record, delay: float) -> bool:
        """Send a call, SIGKILL the plugin `delay` seconds later. Returns whether lightningd
        got `continue` (then it commits), as it would read whatever reached the pipe."""
        assert self.plugin is not None
        rid = self.plugin.send("db_write", {"data_version": r.data_version, "writes": list(r.writes)})
        time.sleep(delay)
        self.plugin.kill()
        resp = self.plugin.responses.pop(rid, None)
        self._forget_plugin()
        if resp is not None and resp.get("result") == {"result": "continue"}:
            self.live.commit(r.writes)
            self.acknowledged += 1
            return True
        return False

    def call_then_crash_before_commit(self, r: Record) -> None:
        """lightningd gets `continue` but dies before its COMMIT: the transaction is lost
        on the node, and after the restart the same data_version comes again."""
        assert self.plugin is not None
        resp = self.plugin.request("db_write", {"data_version": r.data_version, "writes": list(r.writes)})
        assert resp.get("result") == {"result": "continue"}, resp
        self.kill()

    def kill(self) -> None:
        assert self.plugin is not None
        self.plugin.kill()
        self._forget_plugin()

    def stop(self, after_shutdown: Sequence[Record] = ()) -> int:
        """A clean `lightning-cli stop`: shutdown notification, the last writes, stdin closed."""
        assert self.plugin is not None
        self.plugin.notify("shutdown", {"shutdown": {}})
        for r in after_shutdown:
            self.call(r)
        rc = self.plugin.close()
        self._forget_plugin()
        return rc

    def stop_as_lightningd(self, after_shutdown: Sequence[Record] = (), limit: float = 30.0) -> Optional[int]:
        """`lightning-cli stop` as Core Lightning v26 does it: the shutdown notification, its
        last writes, then up to `limit` seconds for the plugin to exit on its own (stdin stays
        open), and a kill after that. The exit status, or None when it had to be killed."""
        assert self.plugin is not None
        p = self.plugin
        p.notify("shutdown", {"shutdown": {}})
        for r in after_shutdown:
            self.call(r)
        try:
            rc: Optional[int] = p.proc.wait(limit)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = None
        p._reader.join(TIMEOUT)
        p.drain()
        self._forget_plugin()
        return rc

    def halt(self) -> None:
        """lightningd's fatal() after a refused db_write: it exits and the plugin's stdin closes."""
        assert self.plugin is not None
        self.plugin.close()
        self._forget_plugin()

    def _forget_plugin(self) -> None:
        assert self.plugin is not None
        self.all_logs.extend(self.plugin.logs)
        self.plugin = None

    def commit_without_plugin(self, r: Record) -> None:
        """lightningd running without the plugin (plain plugin= and a dead plugin): a gap."""
        self.live.commit(r.writes)

    def rpc(self, method: str, params: Optional[Dict[str, Any]] = None) -> Any:
        """A JSON-RPC command, as lightningd forwards one from lightning-cli."""
        assert self.plugin is not None
        resp = self.plugin.request(method, params or {})
        if "error" in resp:
            raise RuntimeError(resp["error"])
        return resp["result"]

    def log_text(self) -> str:
        logs = self.all_logs + (self.plugin.logs if self.plugin else [])
        return "\n".join(f"{lvl}: {m}" for lvl, m in logs)


def run_sessions(node: Node, records: Sequence[Record], before_stop: Optional[Callable[[Node], None]] = None) -> None:
    """Replay a recording with lightningd's restarts where the recording has them."""
    i = 0
    n = len(records)
    while i < n:
        early = []
        while i < n and records[i].pre_init and (not early or records[i].seq == early[-1].seq + 1):
            early.append(records[i])
            i += 1
        node.start(early)
        while i < n and not records[i].pre_init:
            node.call(records[i])
            i += 1
        if before_stop is not None:
            before_stop(node)
        node.stop()
