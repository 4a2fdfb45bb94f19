#!/usr/bin/env python3
"""The multi-gigabyte benchmark (make bench): pibackup on a routing node's database of
`--mb` MiB (default 2048; bench/routing_db.py makes it), as lightningd runs it.

1. first start: the plugin (tests/driver.py, as lightningd starts it) on the existing
   database with an empty destination: its first snapshot (allowed on the hook's path at a
   first start) and the first call;
2. a journal on top: `--calls` db_write calls shaped like a routing node's (bench/workloads.py:
   trace A's statement shapes with fresh blobs and fresh ids), each applied to the database;
3. restore of that generation (snapshot and whole journal) against the `sqlite3` shell
   replaying the same statements on a copy of the database it started from;
4. a compaction (pibackup-compact), with the share of snapshot chunks it carried;
5. restore and verify of the result; verify's read speed against the disk's.

Reported: time, device bytes (as root: the destination is a loop-mounted ext4 image, bytes
written from /sys/block/loopN/stat, as bench/wear.py), peak RSS of the plugin and of the
compaction process, the backup's size against the database's.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import routing_db  # noqa: E402
import workloads  # noqa: E402  (also puts tests/ and the repo on sys.path)
from compaction import allocated  # noqa: E402
from wear import Device, vm_hwm_kb  # noqa: E402
from workloads import driver  # noqa: E402

from pibackup.store import snapfile  # noqa: E402

PY = sys.executable


def mib(n: Optional[float]) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"


def drop_caches() -> None:
    os.sync()
    if os.geteuid() == 0:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


class PeakWatch:
    """Polls the peak RSS (VmHWM) of a process and, apart, of its children (the compaction's)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.plugin_kb = 0
        self.child_kb = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _children(self) -> List[int]:
        out: List[int] = []
        try:
            tasks = os.listdir(f"/proc/{self.pid}/task")  # a child started by any of the plugin's threads
        except OSError:
            return out
        for tid in tasks:
            try:
                out += [int(p) for p in Path(f"/proc/{self.pid}/task/{tid}/children").read_text().split()]
            except OSError:
                pass
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.plugin_kb = max(self.plugin_kb, vm_hwm_kb(self.pid))
            except OSError:
                pass
            for c in self._children():
                try:
                    self.child_kb = max(self.child_kb, vm_hwm_kb(c))
                except OSError:
                    pass
            self._stop.wait(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._t.join()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "pibackup", *args], capture_output=True, text=True, cwd=BENCH.parent)


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    t = time.monotonic()
    fn()
    return time.monotonic() - t


def wait_compacted(node: driver.Node, runs: int, limit: float = 7200) -> Dict[str, object]:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        c = node.rpc("pibackup-status")["compaction"]
        if c.get("runs", 0) >= runs and c["state"] == "idle":
            return c
        if c["state"] == "failed":
            raise SystemExit(f"compaction failed: {c}")
        time.sleep(0.5)
    raise SystemExit("compaction did not finish")


def carried_share(old: Path, new: Path) -> str:
    """How many of the new snapshot's chunks are stored as in the old one (the same plain bytes)."""
    if not snapfile.is_compressed(str(old)):
        return "n/a (plain snapshot before)"
    old_chunks = snapfile.carried_chunks(str(old), snapfile.CHUNK)
    same = total = 0
    for chunk in snapfile.carried_chunks(str(new), snapfile.CHUNK):
        was = next(old_chunks)
        if chunk is None:
            break
        total += 1
        same += was is not None and was[0] == chunk[0]
    return f"{same:,} of {total:,} chunks ({same / max(1, total):.1%}) carried unchanged"


def snapshot_of(dest: Path) -> Path:
    return sorted(dest.glob("gen-*/snapshot-v*"))[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=2048, help="database size in MiB (default 2048; 200 for a quick run)")
    ap.add_argument("--calls", type=int, default=20000, help="db_write calls on top (default 20000)")
    ap.add_argument("--db", type=Path, default=None, help="keep the generated database here, or use it if it exists")
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one under /var/tmp)")
    a = ap.parse_args()
    workloads.byte_compile()
    root = Path(tempfile.mkdtemp(prefix="pibackup-large-", dir=a.dir or "/var/tmp"))
    dev = Device(root, size_mb=max(512, a.mb * 3 + a.calls // 20))  # snapshot, the compaction's work file, the new one
    lines: List[str] = []

    def say(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    try:
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        say(f"# large database: {a.mb} MiB, {a.calls:,} calls, {platform.node()} ({os.cpu_count()} CPUs), {when}")
        say(f"destination: {dev.kind}; load average at start {os.getloadavg()[0]:.2f}")
        netdir = root / "node" / "lightning" / "regtest"
        netdir.mkdir(parents=True)
        live = netdir / "lightningd.sqlite3"
        if a.db is not None and a.db.exists():
            shutil.copyfile(a.db, live)
            say(f"database: a copy of {a.db}")
        else:
            t = timed(lambda: routing_db.generate(live, a.mb, progress=False))
            say(f"generated {mib(live.stat().st_size)} in {t:.0f} s")
            if a.db is not None:
                shutil.copyfile(live, a.db)
        db_bytes = live.stat().st_size
        conn = sqlite3.connect(live)
        dv = conn.execute("SELECT intval FROM vars WHERE name='data_version'").fetchone()[0]
        top = max(
            conn.execute(f"SELECT coalesce(max(id), 0) FROM {t}").fetchone()[0] for t in ("payments", "channel_htlcs", "channel_moves")
        )
        conn.close()
        before = root / "before.sqlite3"
        shutil.copyfile(live, before)  # the sqlite3 shell's starting point
        _, calls = workloads.synthetic_growing(a.calls, start=dv, id_base=(top // 1_000_000 + 1) * 1_000_000)
        dest = dev.mnt / "pibackup"
        dest.mkdir()
        opts = {"pibackup-destination": str(dest), "pibackup-compact-ratio": "0"}  # the compaction is step 4's
        node = driver.Node(root / "node", opts)
        script = root / "statements.sql"
        sql = open(script, "w", encoding="utf-8")
        sql.write("PRAGMA foreign_keys = ON;\nPRAGMA journal_mode = MEMORY;\nPRAGMA synchronous = OFF;\n")  # as restore runs
        try:
            # 1. first start
            w0 = dev.written()
            t0 = time.monotonic()
            node.start([], init=False)
            assert node.plugin is not None
            # The first snapshot of a large database takes minutes, inside init or the first
            # call (lightningd waits for both): no time limit on them here.
            request = node.plugin.request
            node.plugin.request = lambda method, params, timeout=7200: request(method, params, timeout)  # type: ignore[method-assign]
            node.init()
            watch = PeakWatch(node.plugin.proc.pid)
            first = next(calls)
            node.call(first)
            sql.write("BEGIN;\n" + ";\n".join(first.writes) + ";\nCOMMIT;\n")
            t_first = time.monotonic() - t0
            w1 = dev.written()
            progress = [ln for ln in node.log_text().splitlines() if "snapshot" in ln.lower()]
            say(
                f"1. first start (snapshot on the hook's path): {t_first:.1f} s, device {mib((w1 or 0) - (w0 or 0))}, "
                f"backup {mib(allocated(dest))} = {allocated(dest) / db_bytes:.2f}x the database"
            )
            for ln in progress[:6]:
                say(f"   log: {ln.strip()[:150]}")
            # 2. the journal
            t0 = time.monotonic()
            n = 1
            for r in calls:
                node.call(r)
                sql.write("BEGIN;\n" + ";\n".join(r.writes) + ";\nCOMMIT;\n")
                n += 1
            t_journal = time.monotonic() - t0
            sql.close()
            w2 = dev.written()
            lat = sorted(node.latencies[1:])
            p99 = 1000 * lat[int(0.99 * (len(lat) - 1))] if lat else 0.0
            say(
                f"2. journal: {n:,} calls in {t_journal:.1f} s, hook p99 {p99:.2f} ms, device {mib((w2 or 0) - (w1 or 0))} "
                f"({((w2 or 0) - (w1 or 0)) / n / 1024:.1f} KiB per call), SQL {mib(script.stat().st_size)}; "
                f"backup {mib(allocated(dest))} = {allocated(dest) / live.stat().st_size:.2f}x the database"
            )
            # 3. restore of generation 1 (snapshot and the whole journal) against the sqlite3 shell
            out = root / "restored.sqlite3"
            drop_caches()
            t_restore = timed(lambda: check(run_cli("restore", str(dest), str(out))))
            # Where the restore's time goes: the snapshot written out, and SQLite's checks of the result.
            # The checks first, on the file just written (in the page cache, as the restore's own checks found it).
            checker = sqlite3.connect(out)
            t_checks = timed(
                lambda: (checker.execute("PRAGMA integrity_check").fetchone(), checker.execute("PRAGMA foreign_key_check").fetchall())
            )
            checker.close()
            drop_caches()
            plain = root / "expanded.sqlite3"
            snap1 = snapshot_of(dest)
            t_expand = timed(lambda: snapfile.expand(str(snap1), str(plain), None))
            plain.unlink()
            base = root / "shell.sqlite3"
            drop_caches()
            t_copy = timed(lambda: shutil.copyfile(before, base))
            t_shell = timed(lambda: check(subprocess.run(["sqlite3", str(base)], stdin=open(script, "rb"), capture_output=True)))
            shell = t_copy + t_shell
            say(
                f"3. restore (expand the snapshot, replay {n:,} calls): {t_restore:.1f} s; sqlite3 shell on a copy: "
                f"{shell:.1f} s (copy {t_copy:.1f} s + replay {t_shell:.1f} s): restore at {shell / t_restore:.2f}x the shell's speed"
            )
            replay = t_restore - t_expand - t_checks
            say(
                f"   of which: the snapshot written out {t_expand:.1f} s ({db_bytes / t_expand / 2**20:.0f} MiB/s), integrity and "
                f"foreign-key checks {t_checks:.1f} s, the rest (replay, start-up, syncs) {replay:.1f} s: "
                f"the replay at {t_shell / max(replay, 0.001):.2f}x the shell's replay speed"
            )
            differ = subprocess.run(["cmp", "-s", str(out), str(live)]).returncode
            same = "byte-for-byte equal to" if differ == 0 else "not byte-for-byte equal to (page order)"
            say(f"   restored database {same} the live one")
            out.unlink()
            base.unlink()
            # 4. compaction
            old_snap = snapshot_of(dest)
            w3 = dev.written()
            t0 = time.monotonic()
            assert node.rpc("pibackup-compact")["compaction"] == "started"
            c = wait_compacted(node, 1)
            t_compact = time.monotonic() - t0
            w4 = dev.written()
            new_snap = snapshot_of(dest)
            say(
                f"4. compaction: {t_compact:.1f} s, device {mib((w4 or 0) - (w3 or 0))}, peak RSS of the compaction process "
                f"{watch.child_kb / 1024:.1f} MiB; {carried_share(old_snap, new_snap)}; new snapshot {mib(new_snap.stat().st_size)} "
                f"= {new_snap.stat().st_size / live.stat().st_size:.2f}x the database; status {c.get('last', '')}"
            )
            size = allocated(dest)
            say(f"   backup {mib(size)} = {size / live.stat().st_size:.2f}x the database ({mib(live.stat().st_size)})")
            watch.stop()
            say(f"   peak RSS of the plugin over the run: {watch.plugin_kb / 1024:.1f} MiB")
            assert node.stop() == 0
        finally:
            if node.plugin is not None:
                node.kill()  # failed midway: the destination can then be unmounted
            node.live.close()
        # 5. restore and verify of the compacted backup
        drop_caches()
        out = root / "restored.sqlite3"
        t_restore2 = timed(lambda: check(run_cli("restore", str(dest), str(out))))
        speed = live.stat().st_size / t_restore2 / 2**20
        say(f"5. restore after the compaction: {t_restore2:.1f} s ({mib(live.stat().st_size)} at {speed:.0f} MiB/s)")
        out.unlink()
        drop_caches()
        size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
        t_verify = timed(lambda: check(run_cli("verify", str(dest))))
        drop_caches()
        t_disk = timed(lambda: subprocess.run(["cat", str(new_snap)], stdout=subprocess.DEVNULL, check=True))
        disk = new_snap.stat().st_size / t_disk
        say(
            f"   verify: {t_verify:.1f} s for {mib(size)}: {size / t_verify / 2**20:.0f} MiB/s read; the disk reads "
            f"{disk / 2**20:.0f} MiB/s (cat of the snapshot, caches dropped): {size / t_verify / disk:.2f}x"
        )
    finally:
        dev.close()
        shutil.rmtree(root, ignore_errors=True)


def check(r: subprocess.CompletedProcess) -> None:
    if r.returncode != 0:
        raise SystemExit(f"{r.args}: exit {r.returncode}: {(r.stderr or b'')[-2000:]!r}")


if __name__ == "__main__":
    main()
