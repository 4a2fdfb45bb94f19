#!/usr/bin/env python3
"""The synchronous remote copy (pibackup-remote) against the local destination alone, through
the real plugin and the real `pibackup serve` behind a real sshd on 127.0.0.1 (both on this
machine's disk, so the remote's fsync competes with the local one).

Measured: the hook's round trip on trace A's first run (p50, p99; local only, with one
remote, with one remote encrypted); the plugin's peak RSS (VmHWM) after N synthetic calls
shaped like trace A's (growing as a node's database does) with and without a remote; the receiver's RSS every N/10 calls of that
run; and the catch-up after a simulated one-hour outage at a busy node's rate (20 calls a
second, the long run's paced rate: 72,000 calls made while the host is away), from the host's
return until the remote is in step again.

The lightningd/plugins backup plugin's socket backend is not measured beside it: its source is
not published on a package registry (PyPI has no release of it), and it is not taken from
elsewhere.

usage: remote.py [N] [latency]   (N default 50,000; `latency`: the first table only)
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO / "tests"))

import workloads  # noqa: E402
from compaction import hwm_kb, pct  # noqa: E402
from workloads import driver  # noqa: E402

from sshd import Sshd  # noqa: E402

SERVE = f"env PYTHONPATH={REPO} {sys.executable} -m pibackup serve"
OUTAGE_CALLS = 20 * 3600  # one hour at 20 calls a second


def remote_options(sshd: Sshd, remote: Path, **extra: object) -> Dict[str, object]:
    opts: Dict[str, object] = {
        "pibackup-remote": [sshd.target(remote)],
        "pibackup-remote-port": sshd.port,
        "pibackup-remote-identity": sshd.identity,
        "pibackup-remote-known-hosts": sshd.known_hosts,
        "pibackup-remote-command": SERVE,
    }
    opts.update(extra)
    return opts


def in_step(node: driver.Node, timeout: float = 3600.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if all(r["state"] == "in step" for r in node.rpc("pibackup-status")["remote"]):
            return time.monotonic() - t0
        time.sleep(0.05)
    raise RuntimeError("the remote never got in step")


def receiver_pid(remote: Path) -> Optional[int]:
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"serve" in argv and str(remote).encode() in argv:
                return int(d.name)
    return None


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def node_in(root: Path, options: Dict[str, object]) -> driver.Node:
    dest = root / "usb"
    dest.mkdir(parents=True)
    node = driver.Node(root / "node", {"pibackup-destination": str(dest), "pibackup-compact-ratio": "0", **options})
    node.live.conn.execute("PRAGMA synchronous = OFF")  # lightningd's own durability is not measured here
    node.live.conn.execute("PRAGMA journal_mode = MEMORY")  # nor its rollback journal file
    return node


ROUNDS = 5


def latency(configs: Dict[str, Callable[[Path], Dict[str, object]]]) -> List[Dict[str, object]]:
    """Trace A's first run ROUNDS times per configuration, each in fresh directories, the
    configurations taking turns (so a change in the machine's load falls on all of them
    alike); the calls after init."""
    records = driver.first_run(driver.load_trace("A"))
    early = [r for r in records if r.pre_init]
    lat: Dict[str, List[float]] = {label: [] for label in configs}
    for _ in range(ROUNDS):
        for label, options_of in configs.items():
            with tempfile.TemporaryDirectory() as d:
                root = Path(d)
                node = node_in(root, options_of(root))
                node.start(early)
                if "pibackup-remote" in node.options:
                    in_step(node)
                before = len(node.latencies)
                node.calls(records[len(early) :])
                lat[label] += node.latencies[before:]
                node.stop()
                node.live.close()
    return [{"label": k, "calls": len(v), "p50": pct(v, 0.5), "p99": pct(v, 0.99)} for k, v in lat.items()]


def long_run(label: str, n: int, options_of, sshd: Optional[Sshd]) -> Dict[str, object]:
    prefix, calls = workloads.synthetic_growing(n)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        node = node_in(root, options_of(root))
        node.start([r for r in prefix if r.pre_init])
        remote = root / "remote"
        if sshd is not None:
            in_step(node)
        node.calls([r for r in prefix if not r.pre_init])
        samples: List[int] = []
        for k, r in enumerate(calls):
            node.call(r)
            if sshd is not None and k % max(1, n // 10) == 0:
                pid = receiver_pid(remote)
                samples.append(rss_kb(pid) if pid else 0)
        assert node.plugin is not None
        hwm = hwm_kb(node.plugin.proc.pid)
        node.stop()
        node.live.close()
    return {"label": label, "hwm_mb": hwm / 1024, "receiver_mb": [s / 1024 for s in samples]}


def outage(sshd: Sshd) -> Dict[str, object]:
    prefix, calls = workloads.synthetic_growing(OUTAGE_CALLS)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        remote = root / "remote"
        node = node_in(root, remote_options(sshd, remote, **{"pibackup-remote-timeout": 2}))
        node.start([r for r in prefix if r.pre_init])
        in_step(node)
        node.calls([r for r in prefix if not r.pre_init])
        in_step(node)
        sshd.stop()
        pid = receiver_pid(remote)
        if pid:
            os.kill(pid, 9)
        t0 = time.monotonic()
        for r in calls:
            node.call(r)
        made = time.monotonic() - t0
        journal = sum(p.stat().st_size for p in (root / "usb").glob("gen-*/seg-*.pbj"))
        sshd.start()
        catch_up = in_step(node)
        node.stop()
        node.live.close()
    return {"calls": OUTAGE_CALLS, "made_s": made, "journal_mb": journal / 2**20, "catch_up_s": catch_up}


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 50_000
    only_latency = "latency" in sys.argv[1:]
    workloads.byte_compile()
    key = Path(tempfile.mkdtemp()) / "key"
    import subprocess

    subprocess.run([sys.executable, "-m", "pibackup", "keygen", str(key)], cwd=REPO, check=True, capture_output=True)
    with tempfile.TemporaryDirectory() as d:
        sshd = Sshd(Path(d) / "sshd")
        sealed = {"pibackup-remote-encrypt-key": str(key)}
        try:
            rows = latency(
                {
                    "local only": lambda root: {},
                    "local + 1 remote": lambda root: remote_options(sshd, root / "remote"),
                    "local + 1 remote, encrypted": lambda root: remote_options(sshd, root / "remote", **sealed),
                }
            )
            machine = f"{time.strftime('%Y-%m-%d')}, {os.uname().machine}, {os.cpu_count()} cores"
            print(f"\nHook round trip, trace A's first run x{ROUNDS} (ms), {machine}")
            print("| configuration | calls | p50 ms | p99 ms |\n|---|---|---|---|")
            for r in rows:
                print(f"| {r['label']} | {r['calls']} | {r['p50']:.2f} | {r['p99']:.2f} |")
            if not only_latency:
                memory_and_outage(sshd, n)
        finally:
            sshd.close()
            key.unlink()
            key.parent.rmdir()


def memory_and_outage(sshd: Sshd, n: int) -> None:
    without = long_run("without a remote", n, lambda root: {}, None)
    with_remote = long_run("with a remote", n, lambda root: remote_options(sshd, root / "remote"), sshd)
    print(f"\nPeak RSS after {n:,} synthetic calls")
    print("| run | plugin peak RSS MB | receiver RSS MB, every tenth of the run |\n|---|---|---|")
    for r in (without, with_remote):
        print(f"| {r['label']} | {r['hwm_mb']:.1f} | {' '.join(f'{x:.1f}' for x in r['receiver_mb']) or '-'} |")
    o = outage(sshd)
    print(
        f"\nOne-hour outage ({o['calls']:,} calls made while the host was away in {o['made_s']:.0f} s; "
        f"journal {o['journal_mb']:.1f} MB): caught up {o['catch_up_s']:.1f} s after the host returned"
    )


if __name__ == "__main__":
    main()
