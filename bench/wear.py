#!/usr/bin/env python3
"""Wear benchmark (make bench): what pibackup costs the backup medium, against a SQLite
replica (wallet=sqlite3://main:backup), a bare pyln-client plugin and the xz floor.

Every system gets the same transactions, through the real processes: pibackup and the bare
plugin through the test driver (tests/driver.py), as lightningd drives them. As root, the
destination is an ext4 image on a loop device, and device bytes are read from
/sys/block/loopN/stat. Otherwise the destination is a plain directory and device bytes are
not shown. Syncs are counted with strace -c (fsync, fdatasync).
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import workloads  # noqa: E402
from workloads import Record, driver  # noqa: E402

from pibackup.rules.filter import classify  # noqa: E402

STRACE = ["strace", "--seccomp-bpf", "-f", "-c", "-e", "trace=fsync,fdatasync,sync_file_range,msync"]


class Device:
    """Where the backup goes: a loop-mounted ext4 image as root, else a plain directory."""

    def __init__(self, root: Path, size_mb: int):
        self.mnt = root / "mnt"
        self.mnt.mkdir()
        self.loop: Optional[str] = None
        self.img = root / "device.img"
        if os.geteuid() == 0 and shutil.which("losetup") and shutil.which("mkfs.ext4"):
            with open(self.img, "wb") as f:
                f.truncate(size_mb << 20)
            # No lazy inode-table or journal initialisation: its background writes would be
            # counted against whoever runs first.
            subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(self.img)], check=True)
            self.loop = subprocess.run(
                ["losetup", "-f", "--show", str(self.img)], check=True, capture_output=True, text=True
            ).stdout.strip()
            subprocess.run(["mount", self.loop, str(self.mnt)], check=True)

    @property
    def kind(self) -> str:
        return f"ext4 on {self.loop}" if self.loop else "a plain directory (not root: no device bytes)"

    def written(self) -> Optional[int]:
        if not self.loop:
            return None
        os.sync()
        with open(f"/sys/block/{os.path.basename(self.loop)}/stat") as f:
            return int(f.read().split()[6]) * 512  # sectors written

    def close(self) -> None:
        if self.loop:
            subprocess.run(["umount", str(self.mnt)], check=False)
            subprocess.run(["losetup", "-d", self.loop], check=False)


@dataclass
class Result:
    system: str
    workload: str
    tx: int = 0
    device_bytes: Optional[int] = None
    syncs: Optional[int] = None
    latencies: List[float] = field(default_factory=list)
    rss_kb: Dict[str, int] = field(default_factory=dict)  # VmHWM at a point -> KiB
    payload_bytes: Optional[int] = None  # journal bytes (or the xz output)
    critical: Optional[int] = None
    bulk: Optional[int] = None
    frame_syncs: Optional[int] = None  # the writer's own count of per-frame fdatasyncs
    bulk_syncs: Optional[int] = None
    other_syncs: Optional[int] = None  # compaction's cut and switch, start, stop: not for a frame
    compactions: Optional[int] = None  # how many ran: at the replay's speed, a matter of timing

    def per_k(self, v: Optional[float]) -> str:
        return "-" if v is None or not self.tx else f"{1000 * v / self.tx:,.0f}"

    def pct(self, q: float) -> str:
        if not self.latencies:
            return "-"
        s = sorted(self.latencies)
        return f"{1000 * s[min(len(s) - 1, int(q * len(s)))]:.2f}"

    def p99(self) -> Optional[float]:
        s = sorted(self.latencies)
        return s[min(len(s) - 1, int(0.99 * len(s)))] if s else None


def strace_calls(path: Path) -> int:
    total = 0
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[-1] in ("fsync", "fdatasync", "sync_file_range", "msync"):
            total += int(parts[3])
    return total


def plugin_pid(node: driver.Node) -> int:
    """The Python process under strace."""
    assert node.plugin is not None
    pid = node.plugin.proc.pid
    for _ in range(50):
        try:
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            kids = []
        if kids:
            return int(kids[0])
        time.sleep(0.05)
    return pid


def vm_hwm_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def run_plugin(
    system: str, workload: str, prefix: List[Record], calls: Iterable[Record], dev: Device, root: Path, options: dict
) -> Result:
    res = Result(system, workload)
    dest = dev.mnt / f"{system.replace(' ', '-')}-{workload}"
    dest.mkdir()
    st = root / f"strace-{system.replace(' ', '-')}-{workload}.txt"
    node = driver.Node(root / f"node-{system.replace(' ', '-')}-{workload}", {"pibackup-destination": str(dest), **options})
    if system == "bare pyln-client plugin":
        node.plugin_path = BENCH / "bare_plugin.py"
    node.plugin_prefix = [*STRACE, "-o", str(st)]
    before = dev.written()
    early: List[Record] = []
    for r in prefix:  # the first start's calls before init
        if not r.pre_init or (early and r.seq != early[-1].seq + 1):
            break
        early.append(r)
    node.start(early)
    pid = plugin_pid(node)
    for r in prefix[len(early) :]:
        node.call(r)
    node.commit_to_live = False
    for k, r in enumerate(calls, start=1):
        node.call(r)
        if k == 10_000:
            res.rss_kb["10k"] = vm_hwm_kb(pid)
    res.rss_kb["end"] = vm_hwm_kb(pid)
    if system.startswith("pibackup"):
        c = node.rpc("pibackup-status")["counters"]
        res.critical, res.bulk = c["critical_frames"], c["bulk_frames"]
        res.frame_syncs, res.bulk_syncs, res.other_syncs = c["syncs"], c["bulk_syncs"], c.get("other_syncs", 0)
        res.payload_bytes = c["bytes_written"]
        res.compactions = c.get("compactions")
    node.stop()
    node.live.close()
    after = dev.written()
    res.tx = len(node.latencies)
    res.latencies = node.latencies
    res.syncs = strace_calls(st)
    if before is not None and after is not None:
        res.device_bytes = after - before
    return res


def run_replica(workload: str, n: int, dev: Device, root: Path) -> Result:
    res = Result("SQLite replica", workload)
    db = dev.mnt / f"replica-{workload}.sqlite3"
    st = root / f"strace-replica-{workload}.txt"
    before = dev.written()
    out = subprocess.run(
        [*STRACE, "-o", str(st), sys.executable, str(BENCH / "replica.py"), str(db), workload, str(n)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    after = dev.written()
    res.latencies = json.loads(out)["latencies"]
    res.tx = len(res.latencies)
    res.syncs = strace_calls(st)
    if before is not None and after is not None:
        res.device_bytes = after - before
    return res


def xz_floor(workload: str, prefix: List[Record], calls: Iterable[Record], limit: Optional[int]) -> Result:
    """The journaled statements (after the filter), as one stream through xz -9e."""
    res = Result("xz -9e floor", workload)
    comp = lzma.LZMACompressor(preset=9 | lzma.PRESET_EXTREME)
    size = 0
    for k, r in enumerate([*prefix, *calls]):
        if limit is not None and k >= limit:
            break
        kept = classify(r.writes, {"utxoset"}).writes
        size += len(comp.compress(("\n".join(kept) + "\n").encode()))
        res.tx += 1
    res.payload_bytes = size + len(comp.flush())
    return res


SYSTEMS = [
    ("pibackup", {}),
    ("pibackup, no preallocation", {"pibackup-preallocate-kb": 0}),
    ("pibackup, automatic compaction off", {"pibackup-compact-ratio": "0"}),
    ("bare pyln-client plugin", {}),
]


def workload_calls(name: str, n: int):
    if name == "synthetic":
        return workloads.synthetic_growing(n)  # applies cleanly, so compaction (on by default) can run
    return driver.load_trace(name), iter(())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--synthetic", type=int, default=100_000, help="transactions in the synthetic trace")
    ap.add_argument("--xz-sample", type=int, default=20_000, help="transactions of the synthetic trace for the xz floor")
    ap.add_argument("--workloads", default="", help="comma-separated: only these (A, filler-A, synthetic)")
    args = ap.parse_args()
    workloads.byte_compile()
    if not shutil.which("strace"):
        sys.exit("strace is needed (apt install strace)")
    results: List[Result] = []
    with tempfile.TemporaryDirectory(prefix="pibackup-bench-") as tmp:
        root = Path(tmp)
        dev = Device(root, 2048)
        print(f"destination: {dev.kind}; machine: {os.uname().machine}, {os.cpu_count()} cores", flush=True)
        try:
            chosen = [w for w in args.workloads.split(",") if w]
            for name in [w for w in [*driver.trace_names(), "synthetic"] if not chosen or w in chosen]:
                n = args.synthetic if name == "synthetic" else 0
                for system, options in SYSTEMS:
                    prefix, calls = workload_calls(name, n)
                    t0 = time.time()
                    results.append(run_plugin(system, name, list(prefix), calls, dev, root, options))
                    print(f"  {name}: {system} done in {time.time() - t0:.0f} s", flush=True)
                t0 = time.time()
                results.append(run_replica(name, n, dev, root))
                print(f"  {name}: SQLite replica done in {time.time() - t0:.0f} s", flush=True)
                prefix, calls = workload_calls(name, n)
                results.append(xz_floor(name, list(prefix), calls, args.xz_sample if name == "synthetic" else None))
        finally:
            dev.close()
    report(results)


def report(results: List[Result]) -> None:
    head = ["workload", "system", "tx", "device B/1000 tx", "syncs/1000 tx", "p50 ms", "p99 ms", "peak RSS MB", "payload B/tx", "compactions"]
    rows = []
    for r in results:
        rss = r.rss_kb.get("end")
        rows.append(
            [
                r.workload,
                r.system,
                f"{r.tx:,}",
                r.per_k(r.device_bytes),
                r.per_k(r.syncs),
                r.pct(0.5),
                r.pct(0.99),
                f"{rss / 1024:.1f}" if rss else "-",
                f"{r.payload_bytes / r.tx:,.0f}" if r.payload_bytes and r.tx else "-",
                "-" if r.compactions is None else str(r.compactions),
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    print()
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    print()
    print("targets:")
    by = {(r.workload, r.system): r for r in results}
    for w in sorted({r.workload for r in results}):
        pb, rep, bare, xz = (by.get((w, s)) for s in ("pibackup", "SQLite replica", "bare pyln-client plugin", "xz -9e floor"))
        if not (pb and rep and bare and xz):
            continue

        def line(ok: Optional[bool], text: str, w: str = w) -> None:
            mark = "n/a" if ok is None else ("met" if ok else "NOT MET")
            print(f"  [{mark:7}] {w}: {text}")

        if pb.device_bytes and rep.device_bytes:
            ratio = rep.device_bytes / pb.device_bytes
            line(ratio >= 20, f"device bytes {ratio:.1f}x below the SQLite replica (target >= 20x)")
            if w == "A":
                per_tx = pb.device_bytes / pb.tx / 1000
                line(per_tx <= 4.3, f"{per_tx:.2f} KB on the device per transaction (target <= 4.3 KB)")
        else:
            line(None, "device bytes (needs root for a loop device)")
        if pb.critical is not None and pb.frame_syncs is not None and pb.syncs is not None:
            per_crit = (pb.frame_syncs - (pb.bulk_syncs or 0) - (pb.other_syncs or 0)) / max(1, pb.critical)
            line(
                per_crit <= 1.0 and pb.bulk_syncs == 0,
                f"{per_crit:.3f} frame syncs per critical transaction, {pb.bulk_syncs} for bulk ones "
                f"({pb.critical} critical, {pb.bulk} bulk; target <= 1 and 0), {pb.other_syncs} for compaction, "
                "start and stop; all syncs, file creation and "
                f"preallocation included: {pb.syncs} = {pb.syncs / max(1, pb.critical):.3f} per critical",
            )
        p99, rp99 = pb.p99(), rep.p99()
        if p99 is not None and rp99 is not None:
            line(p99 <= rp99, f"hook p99 {1000 * p99:.2f} ms vs replica commit p99 {1000 * rp99:.2f} ms (target <=)")
        if pb.payload_bytes and xz.payload_bytes:
            ratio = (pb.payload_bytes / pb.tx) / (xz.payload_bytes / xz.tx)
            line(ratio <= 2, f"journal {pb.payload_bytes / pb.tx:.0f} B/tx = {ratio:.2f}x the xz floor (target <= 2x)")
        extra = (pb.rss_kb["end"] - bare.rss_kb["end"]) / 1024
        line(extra <= 4, f"peak RSS {extra:+.1f} MB over the bare plugin (target <= 4 MB)")
        if "10k" in pb.rss_kb:
            growth = (pb.rss_kb["end"] - pb.rss_kb["10k"]) / 1024
            line(growth <= 1, f"peak RSS grew {growth:.1f} MB from 10,000 to {pb.tx:,} transactions (target: the same)")
    print()
    print("p50/p99: db_write round trip through the plugin (pibackup, bare) or one transaction's")
    print("execute+commit (replica). syncs: fsync+fdatasync from strace -c, all files and directories.")


if __name__ == "__main__":
    main()
