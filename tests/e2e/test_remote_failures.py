"""pibackup-remote's bad inputs through a real sshd: each a clear message naming the host and
the cause, and nothing acknowledged lost (the remote copy, restored, holds every
transaction lightningd committed once it is in step again)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_remote import (
    assert_remote_holds_every_acknowledged,
    kill_receivers,
    remote_options,
    remote_status,
    wait_in_step,
)

import driver
from driver import REPO
from helpers import assert_nothing_acknowledged_lost, tmpfs

# A stand-in for the link between the Pi and the host: relays the session to the real
# receiver, delaying each piece (a slow link), or cutting the first session after a number
# of bytes, in the middle of a message (the host going down mid-frame).
WRAPPER = """#!{python}
import os, subprocess, sys, threading, time
opts = dict(a.split("=", 1) for a in sys.argv[1:-1])
delay = float(opts.get("delay", "0"))
cut = int(opts.get("cut", "0"))
flag = opts.get("flag", "")
env = dict(os.environ, PYTHONPATH="{repo}")
argv = [sys.executable, "-m", "pibackup", "serve", sys.argv[-1]]
child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
def answers():
    while True:
        data = os.read(child.stdout.fileno(), 65536)
        if not data:
            os._exit(0)
        time.sleep(delay)
        os.write(1, data)
threading.Thread(target=answers, daemon=True).start()
total = 0
while True:
    data = os.read(0, 65536)
    if not data:
        break
    if cut and not os.path.exists(flag) and total + len(data) > cut:
        child.stdin.write(data[: max(1, cut - total)])
        child.stdin.flush()
        open(flag, "w").close()
        child.kill()
        os._exit(1)
    time.sleep(delay)
    child.stdin.write(data)
    child.stdin.flush()
    total += len(data)
child.stdin.close()
child.wait()
"""


def script(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    p.chmod(0o755)
    return str(p)


def wrapper(tmp_path: Path, **opts: object) -> str:
    path = script(tmp_path, "link.py", WRAPPER.format(python=sys.executable, repo=REPO))
    return " ".join([path, *(f"{k}={v}" for k, v in opts.items())])


def halting(sshd, remote: Path, **extra: object):
    return remote_options(sshd, remote, **{"pibackup_remote_on_failure": "halt", "pibackup_remote_timeout": 3, **extra})


def resume(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def start(node: driver.Node, recs):
    early = [r for r in recs if r.pre_init]
    node.start(early)
    return recs[len(early) :]


def halted_with(node: driver.Node, recs, *needles: str) -> str:
    """The node halted on a critical transaction with these words in the log; the local
    backup holds everything acknowledged (and at most the refused transaction besides)."""
    with pytest.raises(driver.Halted):
        node.calls(recs)
    log = node.log_text()
    for n in needles:
        assert n in log, f"{n!r} not in the log:\n{log}"
    version = node.live.version()
    refused = next(r for r in recs if version is None or r.data_version > version)
    dest = Path(node.options["pibackup-destination"])
    assert_nothing_acknowledged_lost(dest, node, dest.parent.parent, f"local-{refused.data_version}", refused)
    return log


@pytest.mark.parametrize(
    "command, cause",
    [
        ("/nonexistent/bin/pibackup serve", "/nonexistent/bin/pibackup is not installed on 127.0.0.1"),
        ("GARBAGE", "is not installed on 127.0.0.1"),
    ],
    ids=["not-installed", "no-such-command"],
)
def test_pibackup_not_installed_there_is_named(command, cause, sshd, traces, make_node, tmp_path):
    remote = tmp_path / "remote"
    node = make_node(**halting(sshd, remote, pibackup_remote_command=command))
    halted_with(node, start(node, driver.first_run(traces["A"])), cause, "cannot take this critical transaction")


def test_an_unknown_host_key_is_refused_never_learned(sshd, traces, make_node, tmp_path):
    remote = tmp_path / "remote"
    empty = tmp_path / "known_hosts_empty"
    empty.write_text("")
    opts = halting(sshd, remote)
    opts["pibackup-remote-known-hosts"] = str(empty)
    node = make_node(**opts)
    halted_with(node, start(node, driver.first_run(traces["A"])), "ssh does not know 127.0.0.1 port", "ssh-keyscan")
    assert empty.read_text() == ""
    assert not remote.exists()


def test_a_receiver_directory_holding_another_nodes_backup_is_left_alone(sshd, traces, make_node, tmp_path):
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / ".pibackup-serve").write_text(json.dumps({"copy_id": "ab" * 16, "node_id": "02" + "cd" * 32, "encrypted": False}))
    (remote / "PIBACKUP").write_text("theirs")
    node = make_node(**halting(sshd, remote))
    halted_with(node, start(node, driver.first_run(traces["A"])), "holds another backup (copy abab", "its own directory")
    assert (remote / "PIBACKUP").read_text() == "theirs"


@pytest.mark.parametrize("case", ["garbage", "v99", "cut"])
def test_garbage_or_a_cut_answer_or_another_protocol_version_from_the_receiver(case, sshd, traces, make_node, tmp_path):
    garbage = script(tmp_path, "garbage.sh", "#!/bin/sh\necho 'Welcome to my NAS, have a nice day'\ncat >/dev/null\n")
    proto = (
        f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(REPO)!r})\n"
        "from pibackup.remote.protocol import Message, WELCOME, read_message, encode\n"
        "m = read_message(sys.stdin.buffer)\n"
        "out = encode(Message(WELCOME, m.seq, {'protocol': 99, 'version': '9.9', 'files': {}}))\n"
        "sys.stdout.buffer.write(out[: len(out) // 2] if sys.argv[0].endswith('cut.py') else out)\nsys.stdout.flush()\n"
    )
    command, cause = {
        "garbage": (garbage, "the receiver's answer is not the protocol (not a pibackup message"),
        "v99": (script(tmp_path, "v99.py", proto), "protocol version mismatch: the receiver (pibackup 9.9) speaks 99"),
        "cut": (script(tmp_path, "cut.py", proto), "ends inside a message"),
    }[case]
    node = make_node(**halting(sshd, tmp_path / "remote", pibackup_remote_command=command))
    halted_with(node, start(node, driver.first_run(traces["A"])), cause)


def test_a_hanging_receiver_sigstop_halts_under_halt_within_the_timeout(sshd, traces, make_node, tmp_path):
    remote = tmp_path / "remote"
    node = make_node(pibackup_compact_ratio="0", **halting(sshd, remote, pibackup_remote_timeout=2))
    recs = start(node, driver.first_run(traces["A"]))
    wait_in_step(node)
    node.calls(recs[:200])
    stopped = kill_receivers(remote, signal.SIGSTOP)
    assert stopped
    try:
        halted_with(node, recs[200:], "did not acknowledge within 2 s (pibackup-remote-timeout)", "cannot take this critical")
    finally:
        resume(stopped)
    assert_remote_holds_every_acknowledged(remote, node, tmp_path, "after-hang")


def test_a_receiver_hanging_while_a_new_generation_is_sent_is_noticed_under_halt(sshd, traces, make_node, tmp_path):
    # A new generation goes to the remote in the background and the hook does not wait for
    # it; but a catch-up that gets no answer for 3 timeouts (at least 30 s) is a hung host.
    remote = tmp_path / "remote"
    node = make_node(pibackup_compact_ratio="0", **halting(sshd, remote, pibackup_remote_timeout=2))
    recs = start(node, driver.first_run(traces["A"]))
    wait_in_step(node)
    node.calls(recs[:300])
    stopped = kill_receivers(remote, signal.SIGSTOP)
    assert stopped
    try:
        assert node.rpc("pibackup-compact")["compaction"] == "started"
        deadline = time.monotonic() + 60
        while remote_status(node)[0]["state"] == "in step" and time.monotonic() < deadline:
            time.sleep(0.1)  # the compaction's new generation takes the remote out of step
        assert remote_status(node)[0]["state"] != "in step"
        node.calls(recs[300:310])  # not waited for: the new generation is on its way
        time.sleep(32)  # past 3 timeouts, at least 30 s, without an answer
        log = halted_with(node, recs[310:], "cannot take this critical")
        assert "while catching up: a hung host?" in log or "no answer" in log or "another pibackup serve" in log, log
    finally:
        resume(stopped)


def test_a_hanging_receiver_under_continue_degraded_is_caught_up_after(sshd, traces, make_node, tmp_path):
    remote = tmp_path / "remote"
    node = make_node(pibackup_compact_ratio="0", **remote_options(sshd, remote, pibackup_remote_timeout=2))
    recs = start(node, driver.first_run(traces["A"]))
    wait_in_step(node)
    node.calls(recs[:200])
    stopped = kill_receivers(remote, signal.SIGSTOP)
    node.calls(recs[200:400])  # answered: one wait of the timeout, then without the remote
    assert remote_status(node)[0]["problem"]
    resume(stopped)
    wait_in_step(node)
    node.calls(recs[400:])
    wait_in_step(node)
    assert node.stop() == 0
    assert_remote_holds_every_acknowledged(remote, node, tmp_path, "caught-up")


def test_the_link_cut_in_the_middle_of_a_message_then_back(sshd, traces, make_node, tmp_path):
    remote = tmp_path / "remote"
    command = wrapper(tmp_path, cut=200_000, flag=tmp_path / "cut-once")
    opts = remote_options(sshd, remote, pibackup_remote_timeout=3, pibackup_remote_command=command)
    node = make_node(pibackup_compact_ratio="0", **opts)
    recs = start(node, driver.first_run(traces["A"]))
    node.calls(recs)
    assert (tmp_path / "cut-once").exists(), "the link must have been cut"
    wait_in_step(node)
    assert "ends inside a message" in node.log_text() or "closed the connection" in node.log_text() or "session" in node.log_text()
    assert node.stop() == 0
    assert_remote_holds_every_acknowledged(remote, node, tmp_path, "after-cut")


def test_a_slow_link_delays_but_loses_nothing_under_halt(sshd, traces, make_node, tmp_path):
    remote = tmp_path / "remote"
    command = wrapper(tmp_path, delay=0.005)
    node = make_node(pibackup_compact_ratio="0", **halting(sshd, remote, pibackup_remote_timeout=10, pibackup_remote_command=command))
    recs = start(node, driver.first_run(traces["A"])[:800])
    wait_in_step(node)
    node.calls(recs)
    wait_in_step(node)
    assert node.stop() == 0
    assert "error" not in [lvl for lvl, _ in node.all_logs], node.log_text()
    assert_remote_holds_every_acknowledged(remote, node, tmp_path, "slow")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs (root)")
def test_the_remote_disk_full_then_enlarged(sshd, traces, make_node, tmp_path):
    mnt = tmp_path / "remote-disk"
    with tmpfs(mnt, "size=64k") as disk:
        remote = disk / "node1"
        node = make_node(pibackup_compact_ratio="0", **remote_options(sshd, remote, pibackup_remote_timeout=3))
        recs = start(node, driver.first_run(traces["A"]))
        node.calls(recs[: len(recs) // 2])
        deadline = time.monotonic() + 60
        while "out of space" not in (remote_status(node)[0]["problem"] or "") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "the remote host is out of space in" in (remote_status(node)[0]["problem"] or ""), node.log_text()
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        node.calls(recs[len(recs) // 2 :])
        wait_in_step(node)
        assert node.stop() == 0
        assert_remote_holds_every_acknowledged(remote, node, tmp_path, "after-full")
