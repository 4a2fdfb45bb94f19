"""lightningd's emergency.recover is kept in every destination, off the hook's path: copied at
start, whenever lightningd rewrites it, and at stop; verify checks it; a copy that cannot be
written is a warning (log, RPC, LED), never a halt."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from helpers import cli

SECRETSTREAM_OVERHEAD = 24 + 17  # libsodium secretstream's header and tag


def write_like_lightningd(netdir: Path, data: bytes) -> None:
    """As chanbackup does: scb.tmp (mode 0400), synced, renamed over emergency.recover."""
    tmp = netdir / "scb.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    os.write(fd, data)
    os.fsync(fd)
    os.close(fd)
    os.rename(tmp, netdir / "emergency.recover")


def scb(n: int) -> bytes:
    """A stand-in for an encrypted static channel backup of `n` channels (random bytes are
    what a secretstream message looks like)."""
    return os.urandom(SECRETSTREAM_OVERHEAD + 20 + 150 * n)


def wait_for(predicate, what: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.parametrize("mode", ["journal", "replica"])
def test_copied_at_start_on_every_rewrite_and_at_stop(mode, make_node, traces, tmp_path):
    dests = [tmp_path / "usb1" / "pibackup", tmp_path / "usb2" / "pibackup"] if mode == "journal" else [tmp_path / "usb1" / "p"]
    for d in dests:
        d.mkdir(parents=True)
    node = make_node(pibackup_mode=mode, pibackup_destination=[str(d) for d in dests])
    first = scb(0)
    write_like_lightningd(node.netdir, first)
    recs = traces["A"]
    node.start(recs[:9])
    for d in dests:  # the start's own pass: before init answered
        assert (d / "emergency.recover").read_bytes() == first
        assert (d / "emergency.recover").stat().st_mode & 0o777 == 0o600
    second = scb(1)  # a channel opened
    write_like_lightningd(node.netdir, second)
    node.calls(recs[9:30])
    wait_for(lambda: all((d / "emergency.recover").read_bytes() == second for d in dests), "the rewritten file in every destination")
    st = node.rpc("pibackup-status")
    assert st["emergency_recover"]["in_backup"] and st["emergency_recover"]["bytes"] == len(second), st
    assert st["warnings"] == [], st
    third = scb(0)  # the channel closed, just before lightningd stops
    write_like_lightningd(node.netdir, third)
    node.stop()
    for d in dests:
        assert (d / "emergency.recover").read_bytes() == third, "the copy at stop"
        assert not (d / "emergency.recover.tmp").exists()
        r = cli("verify", str(d))
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"emergency.recover: {len(third)} bytes, sha256 {hashlib.sha256(third).hexdigest()}" in r.stdout


def test_an_unchanged_file_is_not_written_again(make_node, traces, dest):
    node = make_node()
    data = scb(2)
    write_like_lightningd(node.netdir, data)
    node.start(traces["A"][:9])
    node.stop()
    before = (dest / "emergency.recover").stat()
    again = make_node(pibackup_destination=str(dest))
    again.live.close()
    again.live = node.live
    again.netdir = node.netdir
    again.start()
    again.stop()
    after = (dest / "emergency.recover").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_verify_says_when_the_copy_is_missing_or_not_lightningds(make_node, traces, dest):
    node = make_node()
    node.start(traces["A"][:9])
    node.stop()
    r = cli("verify", str(dest))
    assert r.returncode == 0 and "emergency.recover: none in this backup" in r.stdout, r.stdout + r.stderr
    (dest / "emergency.recover").write_bytes(b"\0" * 10)
    r = cli("verify", str(dest))
    assert r.returncode != 0, r.stdout
    assert "is not lightningd's emergency.recover: 10 bytes" in r.stdout + r.stderr


def test_a_copy_that_cannot_be_written_warns_and_the_node_goes_on(make_node, traces, dest, leds):
    node = make_node(pibackup_led="ACT", pibackup_led_dir=str(leds))
    write_like_lightningd(node.netdir, scb(1))
    recs = traces["A"]
    node.start(recs[:9])
    node.stop()
    # Something in the way of the copy's temporary file: the copy cannot be made.
    newer = scb(2)
    write_like_lightningd(node.netdir, newer)
    (dest / "emergency.recover.tmp").mkdir()
    again = make_node(pibackup_led="ACT", pibackup_led_dir=str(leds))
    again.live.close()
    again.live, again.netdir = node.live, node.netdir
    again.start()
    st = again.rpc("pibackup-status")
    assert st["state"] == "warning" and any("cannot copy emergency.recover" in w for w in st["warnings"]), st
    assert (leds / "ACT" / "trigger").read_text() == "timer"
    again.calls(recs[9:20])  # never a halt
    assert "cannot copy emergency.recover" in again.log_text()
    (dest / "emergency.recover.tmp").rmdir()
    wait_for(lambda: (dest / "emergency.recover").read_bytes() == newer, "the copy at the next pass")
    assert again.rpc("pibackup-status")["warnings"] == []
    again.stop()


def wait_shipped_after(node, since: float) -> None:
    wait_for(lambda: (node.rpc("pibackup-status")["shipping"].get("last_success") or 0) >= since, "a shipping round", 90)


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_shipped_copies_carry_the_newest_emergency_recover_and_node(encrypted, sshd, keyfile, make_node, traces, dest, tmp_path):
    remote = tmp_path / "remote" / "node1"
    remote.parent.mkdir()
    extra = {"pibackup-ship-encrypt-key": str(keyfile)} if encrypted else {}
    key_args = ("--key", str(keyfile)) if encrypted else ()
    node = make_node(pibackup_batch_seconds=0, pibackup_compact_ratio="0", **sshd.options(remote, **extra))
    first = scb(1)
    write_like_lightningd(node.netdir, first)
    recs = traces["A"]
    node.start(recs[:9])
    node.calls(recs[9:40])
    wait_shipped_after(node, time.time())
    assert (remote / "emergency.recover").exists() and (remote / "NODE").exists()
    if encrypted:
        sealed = (remote / "emergency.recover").read_bytes()
        assert sealed[:8] == b"PBKCRYPT" and first not in sealed
        assert b"node_id" not in (remote / "NODE").read_bytes()
    else:
        assert (remote / "emergency.recover").read_bytes() == first
    second = scb(2)  # lightningd rewrote it: the copy follows
    write_like_lightningd(node.netdir, second)
    wait_for(lambda: (dest / "emergency.recover").read_bytes() == second, "the local copy")
    wait_shipped_after(node, time.time())
    node.stop()
    v = cli("verify", sshd.target(remote), *sshd.cli_args(), *key_args)
    assert v.returncode == 0, v.stdout + v.stderr
    assert f"emergency.recover: {len(second)} bytes, sha256 {hashlib.sha256(second).hexdigest()}" in v.stdout, v.stdout
    assert "node id: 036c3e4d" in v.stdout and "network: regtest" in v.stdout
    # After a restart the file is sent once more (it may have changed since the last round).
    node.start([])
    wait_shipped_after(node, time.time())
    node.stop()
    v = cli("verify", sshd.target(remote), *sshd.cli_args(), *key_args)
    assert v.returncode == 0 and hashlib.sha256(second).hexdigest() in v.stdout, v.stdout + v.stderr
