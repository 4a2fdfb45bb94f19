#!/usr/bin/env python3
"""rclone shipping benchmark (make bench): rclone's peak RSS in each call a round makes,
and the plugin's peak RSS without shipping and while shipping through rclone.

Each recording is replayed through the real plugin (tests/driver.py) with 64 KiB segments
(so that segments close and are sent whole, as well as growing by parts) and a round every
second, encrypted: once without shipping, once to rclone's `local` backend, once to
`rclone serve sftp` on 127.0.0.1. rclone is started through a small wrapper first on the
plugin's PATH that runs the real rclone and records its resident set high-water mark
(ru_maxrss from wait4) and subcommand: a round's calls run one after another, so a round's
peak is the largest of its calls'. The plugin's is its VmHWM at the end of the replay.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import workloads  # noqa: E402  (also puts tests/ and the repo on sys.path)
from workloads import driver  # noqa: E402

WRAPPER = """#!{python}
import os, subprocess, sys
proc = subprocess.Popen([{real!r}] + sys.argv[1:])
try:
    _, status, usage = os.wait4(proc.pid, 0)
except KeyboardInterrupt:
    proc.terminate()
    raise
command = next((a for a in sys.argv[1:] if not a.startswith("-")), "?")
with open({log!r}, "a") as f:
    f.write(f"{{command}} {{usage.ru_maxrss}}\\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sftp_server(root: Path, work: Path) -> Tuple[subprocess.Popen, str]:
    """rclone serve sftp of `root` on 127.0.0.1, and an rclone config section for it."""
    port, password = free_port(), secrets.token_hex(12)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / "host_key")], check=True)
    cmd = ["rclone", "serve", "sftp", f"--addr=127.0.0.1:{port}", "--user=bench", f"--pass={password}"]
    proc = subprocess.Popen(cmd + ["--config=/dev/null", f"--key={work / 'host_key'}", str(root)], stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    obscured = subprocess.run(["rclone", "obscure", password], capture_output=True, text=True, check=True).stdout.strip()
    section = f"[sftp]\ntype = sftp\nhost = 127.0.0.1\nport = {port}\nuser = bench\npass = {obscured}\nshell_type = none\n"
    return proc, section


def run(name: str, store: Optional[str]) -> Dict[str, object]:
    """Replay `name`, shipping to `store` (None, "rsync", "local" or "sftp"): peak RSS figures."""
    records = driver.load_trace(name)
    with tempfile.TemporaryDirectory(dir=os.environ.get("PIBACKUP_BENCH_DIR")) as d:
        root = Path(d)
        dest = root / "usb"
        dest.mkdir()
        log = root / "rclone-calls"
        options: Dict[str, object] = {"pibackup-destination": str(dest), "pibackup-segment-size": "64K", "pibackup-compact-ratio": "0"}
        server = None
        env: Dict[str, str] = {}
        sshd = None
        if store is not None:
            key = root / "ship.key"
            subprocess.run([sys.executable, "-m", "pibackup", "keygen", str(key)], cwd=driver.REPO, check=True, capture_output=True)
        if store == "rsync":  # for comparison: the plugin shipping the same, encrypted, with rsync over ssh
            from sshd import Sshd

            sshd = Sshd(root / "sshd")
            options.update(sshd.options(root / "remote", pibackup_ship_encrypt_key=str(key)))
        elif store is not None:
            config = root / "rclone.conf"
            config.write_text("[local]\ntype = local\n")
            spec = f"rclone:local:{root / 'store'}"
            if store == "sftp":
                (root / "sftp-root").mkdir()
                server, section = sftp_server(root / "sftp-root", root)
                config.write_text(section)
                spec = "rclone:sftp:copy"
            wrap = root / "bin"
            wrap.mkdir()
            (wrap / "rclone").write_text(WRAPPER.format(python=sys.executable, real=shutil.which("rclone"), log=str(log)))
            (wrap / "rclone").chmod(0o755)
            env["PATH"] = f"{wrap}:{os.environ.get('PATH', '')}"
            options.update(
                {
                    "pibackup-ship": spec,
                    "pibackup-ship-rclone-config": str(config),
                    "pibackup-ship-encrypt-key": str(key),
                    "pibackup-ship-interval": 1,
                }
            )
        node = driver.Node(root / "node", options)
        node.plugin_env = env
        hwm = 0
        rounds = 0

        def before_stop(n: driver.Node) -> None:
            nonlocal hwm, rounds
            assert n.plugin is not None
            if store is not None:  # the last round brings the copy in step before the figures are taken
                since = time.time()
                for _ in range(600):
                    st = n.rpc("pibackup-status")["shipping"]
                    if st["last_success"] is not None and st["last_success"] >= since:
                        break
                    time.sleep(0.1)
                rounds += st["rounds"]
            hwm = max(hwm, hwm_kb(n.plugin.proc.pid))

        orig_call = node.call

        def call(r: driver.Record) -> None:
            orig_call(r)
            time.sleep(0.005)  # lightningd's calls are spread over time: rounds see the journal grow

        node.call = call  # type: ignore[method-assign]
        try:
            driver.run_sessions(node, records, before_stop=before_stop)
        finally:
            node.live.close()
            if server is not None:
                server.terminate()
                server.wait()
            if sshd is not None:
                sshd.close()
        calls: Dict[str, List[int]] = {}
        if log.exists():
            for line in log.read_text().splitlines():
                command, kb = line.split()
                calls.setdefault(command, []).append(int(kb))
        return {"hwm_mb": hwm / 1024, "rounds": rounds, "calls": calls, "calls_total": len(records)}


def main() -> None:
    if shutil.which("rclone") is None:
        print("rclone is not installed (make setup installs it): skipped")
        return
    workloads.byte_compile()
    rows = []
    for name in ("A", "filler-A"):
        base = run(name, None)
        for store in ("rsync", "local", "sftp"):
            rows.append((name, store, base, run(name, store)))
    print("\nShipping, encrypted: plugin peak RSS without and with it; rclone's peak RSS per call (MB)\n")
    print(
        "| recording | shipping to | rounds | plugin, no shipping | plugin, shipping | rclone calls "
        "| rclone peak, median | rclone peak, max | max by command |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for name, store, base, r in rows:
        calls: Dict[str, List[int]] = r["calls"]  # type: ignore[assignment]
        every = [kb for kbs in calls.values() for kb in kbs]
        by = ", ".join(f"{c} {max(kbs) / 1024:.1f}" for c, kbs in sorted(calls.items())) or "-"
        median = f"{statistics.median(every) / 1024:.1f}" if every else "-"
        peak = f"{max(every) / 1024:.1f}" if every else "-"
        print(
            f"| {name} | {'rsync over ssh' if store == 'rsync' else 'rclone ' + store} | {r['rounds']} | {base['hwm_mb']:.1f} | "
            f"{r['hwm_mb']:.1f} | {len(every)} | {median} | {peak} | {by} |"
        )
    flags()


def flags() -> None:
    """What the flags of every call (rclone_target.SMALL_FLAGS) save: one copy of a 64 MiB
    file (a large node's snapshot) to the local backend, with rclone's defaults and with them."""
    from pibackup.copies.rclone_target import SMALL_FLAGS

    with tempfile.TemporaryDirectory(dir=os.environ.get("PIBACKUP_BENCH_DIR")) as d:
        src = Path(d) / "src"
        src.mkdir()
        with open(src / "snapshot", "wb") as f:
            for _ in range(64):
                f.write(os.urandom(1 << 20))
        print("\nrclone copy of a 64 MiB file to the local backend: peak RSS (MB)\n")
        print("| flags | peak RSS |")
        print("|---|---:|")
        for label, extra in (("rclone's defaults", []), ("pibackup's (SMALL_FLAGS)", SMALL_FLAGS)):
            out = Path(d) / label.split()[0]
            proc = subprocess.Popen(["rclone", "--config=/dev/null", *extra, "copy", str(src), str(out)], stderr=subprocess.DEVNULL)
            _, _, usage = os.wait4(proc.pid, 0)
            print(f"| {label} | {usage.ru_maxrss / 1024:.1f} |")


if __name__ == "__main__":
    main()
