"""Shipping to another host with the real rsync over a real sshd on 127.0.0.1, then
restoring from the remote copy."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import pytest

import dbcompare
import driver
from helpers import cli, received, restore_to, tmpfs, tree_digest
from pibackup.store.layout import is_layout_path
from sshd import Sshd

CRYPT_MAGIC = b"PBKCRYPT"


def shipping(node: driver.Node) -> Dict[str, Any]:
    return node.rpc("pibackup-status")["shipping"]


def wait_in_step(node: driver.Node, since: float, timeout: float = 90.0) -> Dict[str, Any]:
    """Until a shipping round that began after `since` succeeded."""
    deadline = time.monotonic() + timeout
    st: Dict[str, Any] = {}
    while time.monotonic() < deadline:
        st = shipping(node)
        if st["last_success"] is not None and st["last_success"] >= since:
            return st
        time.sleep(0.2)
    raise AssertionError(f"the remote copy never caught up: {st}\n{node.log_text()}")


def wait_failing(node: driver.Node, because: str = "", timeout: float = 90.0) -> Dict[str, Any]:
    """Until shipping reports a failure (whose message holds `because`). Retries come with
    backoff; the message may take a retry to show (rsync at times loses the remote's)."""
    deadline = time.monotonic() + timeout
    st: Dict[str, Any] = {}
    while time.monotonic() < deadline:
        st = shipping(node)
        if st["state"] == "failing" and because in st["last_error"]:
            return st
        time.sleep(0.2)
    raise AssertionError(f"shipping never reported a failure with {because!r}: {st}")


def remote_restore(sshd: Sshd, remote: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return cli("restore", sshd.target(remote), str(out), *sshd.cli_args(), *extra)


def assert_remote_equals_live(sshd: Sshd, remote: Path, node: driver.Node, tmp_path: Path, *extra: str) -> None:
    out = tmp_path / f"from-remote-{time.monotonic_ns()}.sqlite3"
    r = remote_restore(sshd, remote, out, *extra)
    assert r.returncode == 0, r.stdout + r.stderr
    assert dbcompare.backup_differences(node.live.path, out, ("utxoset",)) == []
    v = cli("verify", sshd.target(remote), *sshd.cli_args(), *extra)
    assert v.returncode == 0, v.stdout + v.stderr


def ship_node(make_node, sshd: Sshd, keyfile: Path, tmp_path: Path, encrypted: bool) -> Tuple[driver.Node, Path, Tuple[str, ...]]:
    """A node shipping to tmp_path/remote/node1, encrypted or not, with 64 KiB segments and
    automatic compaction off (a switch between the round a test waited for and its checks
    would change what the local directory holds). Returns the node, the remote directory
    and restore's key arguments."""
    remote = tmp_path / "remote" / "node1"
    remote.parent.mkdir()
    extra = {"pibackup-ship-encrypt-key": str(keyfile)} if encrypted else {}
    node = make_node(
        pibackup_batch_seconds=0, pibackup_segment_size="64K", pibackup_compact_ratio="0", **sshd.options(remote, **extra)
    )
    return node, remote, ("--key", str(keyfile)) if encrypted else ()


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_the_shipped_copy_restores_to_the_live_db(encrypted, sshd, keyfile, traces, make_node, dest, tmp_path):
    node, remote, key_args = ship_node(make_node, sshd, keyfile, tmp_path, encrypted)
    recs = driver.first_run(traces["A"])[:400]
    early = [r for r in recs if r.pre_init]
    node.start(early)
    half = len(recs) // 2
    node.calls(recs[len(early) : half])
    wait_in_step(node, time.time())
    assert_remote_equals_live(sshd, remote, node, tmp_path, *key_args)
    node.calls(recs[half:])
    st = wait_in_step(node, time.time())
    assert st["state"] == "ok" and st["encrypted"] is encrypted and st["rounds"] >= 2
    assert_remote_equals_live(sshd, remote, node, tmp_path, *key_args)
    assert len(list(dest.glob("gen-*/seg-*.pbj"))) > 1, "the test must cover closed segments"

    # The remote directory has the local layout, and the head record of the last round.
    local_files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file() and is_layout_path(str(p.relative_to(dest))))
    remote_files = sorted(str(p.relative_to(remote)) for p in remote.rglob("*") if p.is_file())
    assert remote_files == sorted(local_files + ["HEAD"])
    assert (remote / "HEAD").read_bytes().startswith(CRYPT_MAGIC) is encrypted
    if encrypted:
        for p in remote.rglob("gen-*/*"):
            data = p.read_bytes()
            assert data.startswith(CRYPT_MAGIC), p
            for plain in (b"PIBKJRNL", b"SQLite format 3", b"CREATE TABLE", b"pibackup="):
                assert plain not in data[8:], f"{p} shows {plain!r}: the remote host must learn nothing"
        r = remote_restore(sshd, remote, tmp_path / "nokey.sqlite3")
        assert r.returncode == 1 and "encrypted copy: give the key file with --key" in r.stderr
    else:
        open_seg = node.rpc("pibackup-status")["generation"]
        for p in remote.rglob("gen-*/*"):
            local = (dest / p.relative_to(remote)).read_bytes()
            if p.parent.name == open_seg and p == sorted(remote.glob(f"{open_seg}/seg-*.pbj"))[-1]:
                assert local.startswith(p.read_bytes()), "the open segment's copy is a prefix of it"
            else:
                assert p.read_bytes() == local, f"{p} differs from the closed local file"
    node.stop()
    assert "error" not in [lvl for lvl, _ in node.all_logs], node.log_text()


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
def test_a_compaction_is_shipped_snapshot_first_and_a_copy_caught_mid_round_restores_the_generation_before(
    encrypted, sshd, keyfile, traces, make_node, dest, tmp_path
):
    # A compaction's new generation is sent snapshot first, then its journal, also in the
    # first round after the host was away meanwhile, with a closed segment of it waiting
    # too. A fetched copy caught before its journal, or (shipped by an older pibackup)
    # before its snapshot, restores the generation before, complete up to the switch.
    from test_compact import wait_compacted

    node, remote, key_args = ship_node(make_node, sshd, keyfile, tmp_path, encrypted)
    recs = driver.first_run(traces["A"])[:400]
    early = [r for r in recs if r.pre_init]
    node.start(early)
    node.calls(recs[len(early) : 250])
    wait_in_step(node, time.time())
    head_before = (remote / "HEAD").read_bytes()  # what a copy caught in the round of gen-000002 holds
    sshd.stop()
    node.call(recs[250])  # something to send: a round that must connect fails
    wait_failing(node)  # the rounds below are retries after a failure
    node.rpc("pibackup-compact")
    wait_compacted(node, 1)
    node.calls(recs[251:])
    assert (dest / "gen-000002" / "seg-000002.pbj").exists()  # so its seg-000001 is closed, as the snapshot
    if encrypted:  # while the host is away, nothing is staged (encrypted) on the stick
        assert not list((dest / ".ship").glob("gen-000002/*")), list((dest / ".ship").rglob("*"))
    sshd.start()
    wait_in_step(node, time.time())
    assert sorted(p.name for p in remote.glob("gen-*")) == ["gen-000001", "gen-000002"]
    (snap,) = remote.glob("gen-000002/snapshot-v*.pbsnap")
    # rsync renames each file into place when it is complete: the snapshot was, before the journal began.
    assert snap.stat().st_ctime_ns < (remote / "gen-000002" / "seg-000001.pbj").stat().st_ctime_ns
    assert_remote_equals_live(sshd, remote, node, tmp_path, *key_args)
    node.stop()
    local = restore_to(dest, tmp_path / "gen1.sqlite3", "--generation", "1")
    assert local.returncode == 0, local.stderr

    for missing, why in (("seg-*.pbj", "no journal yet"), ("snapshot-v*.pbsnap", "no snapshot yet")):
        caught = tmp_path / "remote" / f"caught-{why[3:10]}"
        shutil.copytree(remote, caught)
        for p in caught.glob(f"gen-000002/{missing}"):
            p.unlink()
        (caught / "HEAD").write_bytes(head_before)
        out = tmp_path / f"caught-{why[3:10]}.sqlite3"
        r = remote_restore(sshd, caught, out, *key_args)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"gen-000002 of this copy was still being shipped ({why}); using gen-000001" in r.stderr, r.stderr
        assert dbcompare.backup_differences(tmp_path / "gen1.sqlite3", out, ()) == []
        v = cli("verify", sshd.target(caught), *sshd.cli_args(), *key_args)
        assert v.returncode == 0 and "still being shipped" in v.stderr, v.stdout + v.stderr


def test_ssh_host_hanging_then_gone_then_back_loses_nothing_and_never_holds_a_hook(sshd, traces, make_node, tmp_path):
    remote = tmp_path / "remote"
    node = make_node(pibackup_batch_seconds=0, **sshd.options(remote))
    recs = driver.first_run(traces["A"])[:320]
    early = [r for r in recs if r.pre_init]
    node.start(early)
    rest = recs[len(early) :]
    a, b, c = len(rest) // 4, len(rest) // 2, 3 * len(rest) // 4
    node.calls(rest[:a])
    wait_in_step(node, time.time())
    before = list(node.latencies)

    # The host hangs mid-run: rsync waits on it (up to its I/O timeout, 120 s). Every call is
    # still answered (the driver gives up after 60 s): the hook never waits on the network.
    sshd.pause()
    node.call(rest[a])  # something to send: the next round must connect, and hangs
    paused_at = time.time()
    for _ in range(600):  # until a round began after it (rounds run one at a time: any earlier one has ended)
        if (shipping(node)["last_attempt"] or 0) > paused_at:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"no shipping round began: {shipping(node)}")
    hung_rounds = shipping(node)["rounds"]
    node.calls(rest[a + 1 : b])
    during = node.latencies[len(before) :]
    assert shipping(node)["rounds"] == hung_rounds, "no round can have succeeded against a hung host"
    sshd.resume()
    wait_in_step(node, time.time())

    # The host goes away altogether: refused connections, retried with backoff, one warning.
    sshd.stop()
    node.calls(rest[b:c])
    wait_failing(node, "refuses connections: is sshd running there, and the port right?")
    node.calls(rest[c:])
    sshd.start()
    wait_in_step(node, time.time())
    assert_remote_equals_live(sshd, remote, node, tmp_path)
    warnings = [m for lvl, m in node.plugin.logs if lvl == "warn" and "pibackup-ship" in m]
    assert len(warnings) == 1, warnings  # logged once, not once per retry
    assert any("reachable again" in m for _, m in node.plugin.logs)
    node.stop()
    print(
        f"\nhook latency while the ssh host hung: max {max(during) * 1000:.1f} ms over {len(during)} calls "
        f"(before: max {max(before) * 1000:.1f} ms)"
    )


def test_an_unknown_host_key_is_refused_and_the_node_goes_on(sshd, traces, make_node, tmp_path):
    remote = tmp_path / "remote"
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    node = make_node(**sshd.options(remote, pibackup_ship_known_hosts=str(empty)))
    recs = driver.first_run(traces["A"])[:60]
    early = [r for r in recs if r.pre_init]
    node.start(early)
    st = wait_failing(node, "host key")
    assert f"ssh-keyscan -p {sshd.port} 127.0.0.1 >> {empty}" in st["last_error"], st
    node.calls(recs[len(early) :])  # the node is not halted
    assert not remote.exists(), "nothing may reach a host whose key is not known"
    assert node.live.version() == recs[-1].data_version
    node.stop()


def test_a_remote_directory_that_is_not_ours_is_left_alone(sshd, traces, make_node, tmp_path):
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "notes.txt").write_text("someone else's\n")
    node = make_node(**sshd.options(remote))
    node.start([r for r in traces["A"] if r.pre_init][:9])
    wait_failing(node, "holds files this pibackup did not ship (notes.txt)")
    assert sorted(os.listdir(remote)) == ["notes.txt"]
    node.stop()


def test_tampered_truncated_or_swapped_remote_files_are_detected(sshd, keyfile, traces, make_node, dest, tmp_path):
    remote = tmp_path / "remote"
    ship = sshd.options(remote, pibackup_ship_encrypt_key=str(keyfile))
    node = make_node(pibackup_segment_size="64K", pibackup_batch_seconds=0, pibackup_compact_ratio="0", **ship)
    recs = driver.first_run(traces["A"])[:320]
    early = [r for r in recs if r.pre_init]
    node.start(early)
    node.calls(recs[len(early) :])
    wait_in_step(node, time.time())
    node.stop()
    key = ("--key", str(keyfile))
    assert_remote_equals_live(sshd, remote, node, tmp_path, *key)
    segs = sorted(remote.glob("gen-*/seg-*.pbj"))
    assert len(segs) >= 3
    pristine = {p: p.read_bytes() for p in remote.rglob("gen-*/*")}

    def attempt(what: str) -> str:
        r = remote_restore(sshd, remote, tmp_path / f"{what}.sqlite3", *key)
        assert r.returncode == 1, f"{what}: {r.stdout}{r.stderr}"
        assert not (tmp_path / f"{what}.sqlite3").exists()
        for p, data in pristine.items():
            p.write_bytes(data)
        return r.stderr

    data = bytearray(pristine[segs[0]])
    data[len(data) // 2] ^= 0x10
    segs[0].write_bytes(bytes(data))
    assert "fails authentication: the file was altered" in attempt("flip")

    segs[1].write_bytes(pristine[segs[1]][:-40])
    assert "cut short" in attempt("truncate")

    segs[0].write_bytes(pristine[segs[1]])
    assert "fails authentication" in attempt("swap")

    other = tmp_path / "other.key"
    assert cli("keygen", str(other)).returncode == 0
    r = remote_restore(sshd, remote, tmp_path / "otherkey.sqlite3", "--key", str(other))
    assert r.returncode == 1 and "was encrypted with another key" in r.stderr


def test_a_full_remote_disk_is_reported_and_the_node_goes_on(sshd, traces, make_node, tmp_path):
    mnt = tmp_path / "remote-disk"
    with tmpfs(mnt, "size=64k"):
        remote = mnt / "copy"
        node = make_node(pibackup_batch_seconds=0, pibackup_compact_ratio="0", **sshd.options(remote))
        recs = driver.first_run(traces["A"])[:250]
        early = [r for r in recs if r.pre_init]
        node.start(early)
        node.calls(recs[len(early) :])
        wait_failing(node, "the remote host is out of space")
        assert node.live.version() == recs[-1].data_version  # never halted
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        wait_in_step(node, time.time())
        assert_remote_equals_live(sshd, remote, node, tmp_path)
        node.stop()


def test_shipping_resumes_after_a_restart_without_sending_closed_files_again(sshd, keyfile, traces, make_node, dest, tmp_path):
    remote = tmp_path / "remote"
    ship = sshd.options(remote, pibackup_ship_encrypt_key=str(keyfile))
    node = make_node(pibackup_segment_size="64K", pibackup_batch_seconds=0, pibackup_compact_ratio="0", **ship)
    recs = driver.first_run(traces["A"])[:320]
    early = [r for r in recs if r.pre_init]
    node.start(early)
    half = len(recs) // 2
    node.calls(recs[len(early) : half])
    wait_in_step(node, time.time())
    node.stop()
    closed = {p: p.stat().st_mtime_ns for p in sorted(remote.glob("gen-*/*"))[:-1]}
    node.start([])
    node.calls(recs[half:])
    st = wait_in_step(node, time.time())
    assert {p: p.stat().st_mtime_ns for p in closed} == closed, "closed files were sent again"
    assert_remote_equals_live(sshd, remote, node, tmp_path, "--key", str(keyfile))
    assert st["state"] == "ok"
    node.stop()


def test_a_generation_removed_locally_is_removed_remotely(sshd, traces, make_node, dest, tmp_path):
    remote = tmp_path / "remote"
    node = make_node(pibackup_batch_seconds=0, **sshd.options(remote))
    recs = driver.first_run(traces["A"])
    early = [r for r in recs if r.pre_init]
    node.start(early)
    node.calls(recs[len(early) : 40])
    node.stop()
    node.commit_without_plugin(recs[40])  # lightningd ran without the plugin: a new generation
    node.start([])
    node.calls(recs[41:60])
    wait_in_step(node, time.time())
    assert sorted(p.name for p in remote.glob("gen-*")) == ["gen-000001", "gen-000002"]
    shutil.rmtree(dest / "gen-000001")  # what retention does once gen-000002 is complete
    wait_in_step(node, time.time())
    assert sorted(p.name for p in remote.glob("gen-*")) == ["gen-000002"]
    assert_remote_equals_live(sshd, remote, node, tmp_path)
    node.stop()


def test_a_remote_copy_behind_warns_in_status_led_and_log_then_clears(sshd, traces, make_node, tmp_path, leds, notify_socket):
    sock, path = notify_socket
    remote = tmp_path / "remote"
    node = make_node(
        pibackup_batch_seconds=0, pibackup_led="ACT", pibackup_led_dir=str(leds), **sshd.options(remote, pibackup_ship_warn_after=3)
    )
    node.plugin_env = {"NOTIFY_SOCKET": path}
    recs = driver.first_run(traces["A"])
    early = [r for r in recs if r.pre_init]
    node.start(early)
    rest = recs[len(early) :]
    node.calls(rest[:50])
    wait_in_step(node, time.time())
    assert (leds / "ACT" / "trigger").read_text() == "heartbeat"
    received(sock, "shipped ")

    sshd.stop()
    node.calls(rest[50:100])
    wait_failing(node, "refuses connections")  # ssh's first complaint may differ while sshd stops
    deadline = time.monotonic() + 60
    st = node.rpc("pibackup-status")
    while not st["warnings"] and time.monotonic() < deadline:
        time.sleep(0.3)
        st = node.rpc("pibackup-status")
    assert st["state"] == "warning", st
    assert st["warnings"][0].startswith(f"shipping to {sshd.target(remote)} is behind: the remote copy was last in step at ")
    assert (leds / "ACT" / "trigger").read_text() == "timer"
    received(sock, f"WARNING: shipping to {sshd.target(remote)}")
    assert node.plugin is not None

    def behind() -> list:
        return [m for lvl, m in node.plugin.logs if lvl == "warn" and " is behind: " in m]

    logged = behind()
    for _ in range(5):
        time.sleep(0.3)
        node.rpc("pibackup-status")
    # Logged once per cause (ssh's first complaint may differ while sshd stops), not per check.
    assert logged and behind() == logged and len(set(logged)) == len(logged), logged

    sshd.start()
    wait_in_step(node, time.time())
    st = node.rpc("pibackup-status")
    assert st["state"] == "ok" and st["warnings"] == [], st
    assert (leds / "ACT" / "trigger").read_text() == "heartbeat"
    received(sock, "pibackup: ok")
    assert_remote_equals_live(sshd, remote, node, tmp_path)
    node.stop()


def test_staging_never_takes_the_space_the_backup_needs(sshd, traces, make_node, tmp_path):
    with tmpfs(tmp_path / "small-stick", "size=40m") as mnt:
        dest = mnt / "pibackup"
        dest.mkdir()
        remote = tmp_path / "remote"
        node = make_node(pibackup_destination=str(dest), pibackup_batch_seconds=0, **sshd.options(remote))
        recs = driver.first_run(traces["A"])[:120]
        early = [r for r in recs if r.pre_init]
        node.start(early)
        wait_failing(node, "not enough free space on the backup medium to stage")
        node.calls(recs[len(early) :])  # the local backup goes on
        assert node.live.version() == recs[-1].data_version
        assert not list((dest / ".ship").rglob("*.pbj")), "nothing staged"
        node.stop()


def test_a_new_stick_never_overwrites_or_deletes_the_remote_copy(sshd, traces, make_node, dest, tmp_path):
    remote = tmp_path / "remote"
    node = make_node(pibackup_batch_seconds=0, **sshd.options(remote))
    recs = driver.first_run(traces["A"])[:200]
    early = [r for r in recs if r.pre_init]
    node.start(early)
    node.calls(recs[len(early) : 100])
    node.stop()
    node.commit_without_plugin(recs[100])
    node.start([])  # a gap: gen-000002 from a snapshot
    node.calls(recs[101:150])
    wait_in_step(node, time.time())
    node.stop()
    before = tree_digest(remote)
    assert sorted(p.name for p in remote.glob("gen-*")) == ["gen-000001", "gen-000002"]
    # The stick is replaced by an empty one, with the same mount point and the same
    # shipping state copied over by hand: it starts again at gen-000001.
    state = (dest / ".ship" / "state.json").read_bytes()
    shutil.rmtree(dest)
    dest.mkdir()
    (dest / ".ship").mkdir()
    (dest / ".ship" / "state.json").write_bytes(state)
    (dest / "PIBACKUP").write_text("pibackup backup directory\nformat 1\n")
    node.start([])
    node.calls(recs[150:])
    wait_failing(node, "is not the gen-000001 already shipped")
    assert tree_digest(remote) == before, "the remote copy must stay as it was"
    node.stop()


class RecordingTransport:
    """A host that only notes what the round asks of it: the order of the calls is the
    whole contract a new Transport must keep."""

    def __init__(self) -> None:
        self.calls: List[Tuple[str, Tuple[str, ...]]] = []

    def describe(self) -> str:
        return "pi@host:/srv/pb"

    def list(self, recursive: bool = False) -> None:
        self.calls.append(("list", ()))
        return None  # a new directory: everything is sent

    def send(self, root: str, rels: Sequence[str], append: bool, growing: bool = False) -> None:
        self.calls.append(("send", tuple(rels)))

    def fetch(self, rel: str, into: str, max_bytes: int) -> bool:
        return False

    def fetch_copy(self, into: str, max_file: int, still_room: Callable[[], bool]) -> bool:
        return True

    def delete(self, generations: Sequence[str]) -> None:
        self.calls.append(("delete", tuple(generations)))

    def cancel(self) -> None:
        pass


def test_a_round_asks_its_transport_for_closed_files_snapshot_first_then_the_head_then_deletions(
    traces, make_node, dest, tmp_path
):
    from pibackup.copies.crypt import Key
    from pibackup.copies.shipper import ShipRound
    from pibackup.copies.staging import Staging
    from pibackup.copies.target import ShipConfig, parse_target

    node = make_node(pibackup_batch_seconds=0)
    recs = driver.first_run(traces["A"])[:150]
    early = [r for r in recs if r.pre_init]
    node.start(early)
    node.calls(recs[len(early) : 100])
    node.stop()
    node.commit_without_plugin(recs[100])
    node.start([])  # a gap: gen-000002 from a snapshot
    node.calls(recs[101:])
    node.stop()
    for key in (None, Key(os.urandom(32))):
        local = tmp_path / f"local-{key is not None}"
        shutil.copytree(dest, local)
        cfg = ShipConfig(parse_target("pi@host:/srv/pb"), 22, None, None, 60.0, 900.0, key)
        host = RecordingTransport()
        ship = ShipRound(cfg, str(local), lambda: None, lambda *a: None, host, Staging(str(local), key))
        ship.open()
        ship.run(retrying=False)
        sent = [rel for call, rels in host.calls if call == "send" for rel in rels]
        assert host.calls[0] == ("list", ()) and sent[0] == "PIBACKUP", host.calls
        (snap,) = [i for i, rel in enumerate(sent) if rel.startswith("gen-000002/snapshot-")]
        first_seg = min(i for i, rel in enumerate(sent) if rel.startswith("gen-000002/seg-"))
        assert max(i for i, rel in enumerate(sent) if rel.startswith("gen-000001/")) < snap < first_seg, sent
        assert host.calls[-1] == ("send", ("HEAD",)) and sent.count("HEAD") == 1, host.calls
        # Retention took gen-000001: the head record without it goes first, then the deletion.
        shutil.rmtree(local / "gen-000001")
        host.calls.clear()
        ship.run(retrying=False)
        assert host.calls == [("send", ("HEAD",)), ("delete", ("gen-000001",))], host.calls
