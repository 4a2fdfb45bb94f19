"""Durability order, read from the system calls of both ends (strace): for every critical
transaction, the receiver wrote its frame and its fdatasync returned before the plugin
wrote `continue` to lightningd. Each process is traced on its own with microsecond
timestamps and call durations, on one machine, so the two logs share one clock."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest
from test_remote import SERVE, remote_options, wait_in_step

import driver
from pibackup.rules.filter import DEFAULT_FILTER, classify
from pibackup.store.segment import FRAME_FIELDS, FRAME_HEADER_SIZE, HEADER_SIZE

_LINE = re.compile(r"^(\d+) +(\d+\.\d+) (.*)$")
_CALL = re.compile(r"^(\w+)\((.*)\) += (-?\d+|\?)(?: [A-Z]+ \(.*\))? <(\d+\.\d+)>$", re.S)


def calls(path: Path) -> Iterator[Tuple[str, float, float, str]]:
    """(syscall, entry time, exit time, arguments) of a `strace -f -ttt -T -xx` log."""
    pending: Dict[str, Tuple[float, str]] = {}
    for line in path.read_text(encoding="ascii").splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        pid, t, rest = m.group(1), float(m.group(2)), m.group(3)
        if rest.endswith(" <unfinished ...>"):
            pending[pid] = (t, rest[: -len(" <unfinished ...>")])
            continue
        if rest.startswith("<... "):
            name, _, tail = rest[5:].partition(" resumed>")
            t0, head = pending.pop(pid)
            rest, t = f"{head}{tail}", t0
        c = _CALL.match(rest)
        if c:
            yield c.group(1), t, t + float(c.group(4)), c.group(2)


def data(args: str) -> bytes:
    m = re.search(r'"((?:\\x[0-9a-f]{2})*)"', args)
    assert m is not None and '"...' not in args, args[:100]
    return bytes.fromhex(m.group(1).replace("\\x", ""))


def frames(chunk: bytes, offset: int) -> List[int]:
    """data_versions of the whole frames in a plain segment append at `offset`."""
    pos = HEADER_SIZE if offset == 0 else 0
    out = []
    while pos + FRAME_HEADER_SIZE <= len(chunk):
        _, _, _, version, length = FRAME_FIELDS.unpack_from(chunk, pos)
        out.append(version)
        pos += FRAME_HEADER_SIZE + length
    return out


TRACE = ["strace", "-f", "-ttt", "-T", "-xx", "-s", str(1 << 23)]


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is needed (apt install strace)")
def test_the_receiver_syncs_before_it_acks_and_the_plugin_answers_only_after(sshd, traces, make_node, tmp_path):
    remote = tmp_path / "remote"
    receiver_log, plugin_log = tmp_path / "receiver.strace", tmp_path / "plugin.strace"
    command = " ".join([*TRACE, "-e", "trace=pwrite64,fdatasync,write", "-o", str(receiver_log), SERVE])
    opts = remote_options(sshd, remote, pibackup_remote_on_failure="halt", pibackup_remote_command=command)
    node = make_node(pibackup_compact_ratio="0", **opts)
    node.plugin_prefix = [*TRACE, "-e", "trace=read,write", "-o", str(plugin_log)]
    recs = driver.first_run(traces["A"])[:600]
    early = [r for r in recs if r.pre_init]
    node.start(early)
    wait_in_step(node)
    node.calls(recs[len(early) :])
    assert node.stop() == 0

    critical, written, synced, answered = timeline(receiver_log, plugin_log, recs[len(early) :])
    assert len(critical) > 50, "the run must hold critical transactions"
    assert order_violations(critical, written, synced, answered) == []
    # Control: the same logs with the receiver's clock moved 5 s later, as if it had synced
    # after the answers: every critical transaction must be reported.
    later = {v: t + 5.0 for v, t in synced.items()}
    assert len(order_violations(critical, written, later, answered)) == len(critical)
    print(f"{len(critical)} critical transactions: each synced on the remote before lightningd got continue")


def timeline(receiver_log: Path, plugin_log: Path, recs: List[driver.Record]):
    """The critical data_versions answered `continue`, and for each data_version when the
    receiver wrote its frame, when a sync of that file covering it returned, and when the
    plugin wrote its answer."""
    written: Dict[int, float] = {}
    synced: Dict[int, float] = {}
    unsynced: Dict[str, List[int]] = {}  # file descriptor -> data_versions written, not yet synced
    for name, t0, t1, args in calls(receiver_log):
        fd = args.split(",", 1)[0]
        if name == "pwrite64":
            offset = int(args.rsplit(",", 1)[1])
            for v in frames(data(args), offset):
                written.setdefault(v, t0)
                unsynced.setdefault(fd, []).append(v)
        elif name == "fdatasync":
            for v in unsynced.pop(fd, []):
                synced.setdefault(v, t1)
    stdin = b"".join(data(a) for n, _, _, a in calls(plugin_log) if n == "read" and a.startswith("0,"))
    request = rb'"id": "(cln:db_write#\d+)", "method": "db_write", "params": \{"data_version": (\d+)'
    version_of = {m.group(1).decode(): int(m.group(2)) for m in re.finditer(request, stdin)}
    answered: Dict[int, float] = {}
    for name, t0, _, args in calls(plugin_log):
        if name == "write" and args.startswith("1,"):
            text = data(args).decode("utf-8", "replace")
            for rid in re.findall(r'"id": ?"(cln:db_write#\d+)"', text):
                if "continue" in text:
                    answered.setdefault(version_of[rid], t0)
    critical = [r.data_version for r in recs if classify(r.writes, DEFAULT_FILTER).critical and r.data_version in answered]
    return critical, written, synced, answered


Times = Dict[int, float]


def order_violations(critical: List[int], written: Times, synced: Times, answered: Times) -> List[str]:
    out = []
    for v in critical:
        if v not in written or v not in synced:
            out.append(f"data_version {v} was answered but never synced by the receiver")
        elif not written[v] < synced[v] <= answered[v]:
            out.append(f"data_version {v}: written {written[v]:.6f}, synced {synced[v]:.6f}, answered {answered[v]:.6f}")
    return out
