"""rclone copies when things go wrong: the store's server stopped, a full store, altered or
missing objects, a wrong key, a missing or broken rclone config, an unknown remote, no
rclone. Each gets a clear message; the node never waits on it and loses nothing."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, Iterator

import pytest
from test_rclone import RcloneServe, Stores, assert_copy_equals_live, cli_args, objects_of, ship_options
from test_ship import wait_failing, wait_in_step

import dbcompare
import driver
from helpers import cli, restore_to, tmpfs
from pibackup.app.config import ConfigError, parse_ship
from pibackup.errors import PibackupError

pytestmark = pytest.mark.skipif(shutil.which("rclone") is None, reason="rclone is not installed (make setup installs it)")


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stores]:
    s = Stores(tmp_path_factory.mktemp("rclone"))
    yield s
    s.close()


def local_equals_live(dest: Path, node: driver.Node, tmp_path: Path) -> None:
    out = tmp_path / f"local-{time.monotonic_ns()}.sqlite3"
    r = restore_to(dest, out)
    assert r.returncode == 0, r.stderr
    assert dbcompare.backup_differences(node.live.path, out, ("utxoset",)) == []


@pytest.mark.parametrize("remote", ["sftp", "dav"])
def test_a_store_stopped_and_started_again_loses_nothing_and_never_holds_a_hook(
    remote, stores, keyfile, traces, make_node, tmp_path, leds
):
    server = stores.servers[remote]
    spec, _ = stores.spec(remote, f"restart-{tmp_path.name}")
    node = make_node(
        **ship_options(stores, spec, keyfile, pibackup_ship_warn_after=2, pibackup_led="ACT", pibackup_led_dir=str(leds))
    )
    recs = driver.first_run(traces["A"])[:320]
    early = [r for r in recs if r.pre_init]
    node.start(early)
    rest = recs[len(early) :]
    a, b = len(rest) // 3, 2 * len(rest) // 3
    node.calls(rest[:a])
    wait_in_step(node, time.time())
    server.stop()
    try:
        node.calls(rest[a:b])  # every call answered while the store is away
        wait_failing(node, "refuses connections")
        node.calls(rest[b:])
        assert node.live.version() == rest[-1].data_version
        deadline = time.monotonic() + 30  # the lag warning, as for rsync: status, LED
        st = node.rpc("pibackup-status")
        while not st["warnings"] and time.monotonic() < deadline:
            time.sleep(0.2)
            st = node.rpc("pibackup-status")
        assert st["state"] == "warning" and st["warnings"][0].startswith(f"shipping to {spec} is behind"), st
        assert (leds / "ACT" / "trigger").read_text() == "timer"
    finally:
        server.start()
    wait_in_step(node, time.time())
    st = node.rpc("pibackup-status")
    assert st["state"] == "ok" and st["warnings"] == [] and (leds / "ACT" / "trigger").read_text() == "heartbeat", st
    assert_copy_equals_live(stores, spec, node, tmp_path, keyfile)
    assert node.plugin is not None
    warnings = [m for lvl, m in node.plugin.logs if lvl == "warn" and "pibackup-ship" in m]
    assert len(warnings) == 1 and "refuses connections" in warnings[0], warnings  # once, not once per retry
    assert any("reachable again" in m for _, m in node.plugin.logs)
    node.stop()


def test_a_hung_store_never_holds_a_hook_nor_the_plugin_s_stop(stores, keyfile, traces, make_node, tmp_path):
    server = stores.servers["sftp"]
    spec, _ = stores.spec("sftp", f"hung-{tmp_path.name}")
    node = make_node(**ship_options(stores, spec, keyfile))
    recs = driver.first_run(traces["A"])[:300]
    early = [r for r in recs if r.pre_init]
    node.start(early)
    rest = recs[len(early) :]
    half = len(rest) // 2
    node.calls(rest[:half])
    wait_in_step(node, time.time())
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)  # connections are accepted, nothing answers
    try:
        paused_at = time.time()
        node.call(rest[half])
        for _ in range(600):  # until a round began against the hung server
            if (node.rpc("pibackup-status")["shipping"]["last_attempt"] or 0) > paused_at:
                break
            time.sleep(0.05)
        node.calls(rest[half + 1 :])  # every call answered while rclone waits on the server
        assert node.live.version() == rest[-1].data_version
        assert node.stop() == 0, node.log_text()  # the round's rclone is ended; the plugin exits
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    node.start([])
    wait_in_step(node, time.time())
    assert_copy_equals_live(stores, spec, node, tmp_path, keyfile)
    node.stop()


def test_a_full_store_is_reported_and_the_node_goes_on(stores, keyfile, traces, make_node, dest, tmp_path):
    with tmpfs(tmp_path / "store-disk", "size=64k") as mnt:
        server = RcloneServe("sftp", mnt / "root", tmp_path)
        try:
            config = tmp_path / "rclone.conf"
            config.write_text(server.remote_section("small"))
            spec = "rclone:small:copy"
            node = make_node(**ship_options(stores, spec, keyfile, pibackup_ship_rclone_config=str(config)))
            recs = driver.first_run(traces["A"])[:250]
            early = [r for r in recs if r.pre_init]
            node.start(early)
            node.calls(recs[len(early) :])
            st = wait_failing(node, "is full")
            assert "free space or raise the quota there" in st["last_error"], st
            assert node.live.version() == recs[-1].data_version  # never halted
            local_equals_live(dest, node, tmp_path)
            subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
            wait_in_step(node, time.time())
            r = cli("restore", spec, str(tmp_path / "after.sqlite3"), "--rclone-config", str(config), "--key", str(keyfile))
            assert r.returncode == 0, r.stdout + r.stderr
            assert dbcompare.backup_differences(node.live.path, tmp_path / "after.sqlite3", ("utxoset",)) == []
            node.stop()
        finally:
            server.stop()


def test_altered_or_missing_objects_and_a_wrong_key_are_detected(stores, keyfile, traces, make_node, tmp_path):
    spec, store = stores.spec("disk", "altered")
    node = make_node(**ship_options(stores, spec, keyfile))
    recs = driver.first_run(traces["A"])[:305]
    early = [r for r in recs if r.pre_init]
    node.start(early)
    node.calls(recs[len(early) : 300])
    wait_in_step(node, time.time())
    for r in recs[300:]:  # the open segment grows by parts, one round each
        node.call(r)
        wait_in_step(node, time.time())
    node.stop()
    assert_copy_equals_live(stores, spec, node, tmp_path, keyfile)
    names = objects_of(store)
    segs = sorted(store / n for n in names if n.endswith(".pbj"))
    parts = sorted(store / n for n in names if ".part-" in n)
    assert len(segs) >= 3 and parts, names
    pristine = {p: p.read_bytes() for p in store.rglob("gen-*/*")}

    def attempt(what: str, *extra: str, written: bool = False) -> str:
        """A restore that fails (exit 1); no database unless `written` (a copy older than its
        records is restored, with the loud warning, as from an ssh host)."""
        out = tmp_path / f"{what}.sqlite3"
        r = cli("restore", spec, str(out), *(extra or cli_args(stores, keyfile)))
        assert r.returncode == 1, f"{what}: {r.stdout}{r.stderr}"
        assert out.exists() is written, what
        for p, data in pristine.items():
            p.write_bytes(data)
        return r.stderr

    data = bytearray(pristine[segs[0]])
    data[len(data) // 2] ^= 0x10
    segs[0].write_bytes(bytes(data))
    assert "fails authentication: the file was altered" in attempt("flip")

    segs[1].write_bytes(pristine[segs[1]][:-40])
    assert "cut short" in attempt("truncate")

    segs[1].unlink()
    err = attempt("missing")
    assert "a segment is missing" in err, err

    data = bytearray(pristine[parts[-1]])
    data[-10] ^= 0x01
    parts[-1].write_bytes(bytes(data))
    assert "fails authentication" in attempt("part-flip")

    parts[0].unlink()  # the newest segment then ends at its base: shorter than the head record says
    err = attempt("part-missing", written=True)
    assert "older than its own records" in err, err

    other = tmp_path / "other.key"
    assert cli("keygen", str(other)).returncode == 0
    err = attempt("otherkey", "--rclone-config", str(stores.config), "--key", str(other))
    assert "was encrypted with another key" in err, err


def test_rclone_config_problems_and_no_rclone_each_say_what_to_do(stores, keyfile, traces, make_node, dest, tmp_path):
    recs = driver.first_run(traces["A"])[:120]
    early = [r for r in recs if r.pre_init]
    rest = recs[len(early) :]
    broken = tmp_path / "broken.conf"
    broken.write_text("[disk\ntype = local\n")
    cases: Dict[str, Any] = {
        "unknown remote": ("rclone:nosuch:copy", stores.config, "rclone has no remote named 'nosuch' in"),
        "broken config": (f"rclone:disk:{tmp_path / 'c1'}", broken, "rclone cannot read its config"),
    }
    for why, (spec, config, message) in cases.items():
        node = make_node(**ship_options(stores, spec, keyfile, pibackup_ship_rclone_config=str(config)))
        node.start(early)
        st = wait_failing(node, message)
        assert str(config) in st["last_error"], (why, st)
        node.calls(rest)  # the node goes on
        assert node.live.version() == rest[-1].data_version, why
        node.stop()
        local_equals_live(dest, node, tmp_path)
        shutil.rmtree(dest)
        dest.mkdir()

    # A config file that is not there, and no rclone on lightningd's PATH: refused at start.
    no_rclone = tmp_path / "bin-without-rclone"
    no_rclone.mkdir()
    for env, extra, message in (
        ({}, {"pibackup_ship_rclone_config": str(tmp_path / "nothere.conf")}, "cannot read"),
        ({"PATH": str(no_rclone)}, {}, "needs rclone, which is not on lightningd's PATH: apt install rclone"),
    ):
        node = make_node(**ship_options(stores, f"rclone:disk:{tmp_path / 'c2'}", keyfile, **extra))
        node.plugin_env = env
        node.start([])
        with pytest.raises(driver.Halted):
            node.call(early[0])
        assert message in node.log_text(), node.log_text()
        assert node.live.version() is None, "nothing unbacked is committed"

    # rclone gone while the plugin runs (uninstalled): the round says so; the node goes on.
    some_bin = tmp_path / "bin"
    some_bin.mkdir()
    (some_bin / "rclone").symlink_to(shutil.which("rclone") or "/usr/bin/rclone")
    spec = f"rclone:disk:{tmp_path / 'c3'}"
    node = make_node(**ship_options(stores, spec, keyfile))
    node.plugin_env = {"PATH": str(some_bin)}
    node.start(early)
    wait_in_step(node, time.time())
    (some_bin / "rclone").unlink()
    node.calls(rest)
    wait_failing(node, "rclone is not installed (or not on lightningd's PATH): apt install rclone")
    assert node.live.version() == rest[-1].data_version
    node.stop()
    local_equals_live(dest, node, tmp_path)
    env = dict(os.environ, PATH=str(some_bin))
    r = subprocess.run(
        [driver.sys.executable, "-m", "pibackup", "restore", spec, str(tmp_path / "x.sqlite3"), *cli_args(stores, keyfile)],
        cwd=driver.REPO, env=env, capture_output=True, text=True,
    )
    assert r.returncode == 1 and "rclone is not installed" in r.stderr, r.stderr


@pytest.mark.parametrize(
    "options, message",
    [
        ({"pibackup-ship": "rclone:"}, "is not rclone:REMOTE:path"),
        ({"pibackup-ship": "rclone:mycloud"}, "is not rclone:REMOTE:path"),
        ({"pibackup-ship": "rclone:mycloud:"}, "give a directory of its own"),
        ({"pibackup-ship": "rclone::s3,access_key_id=X:bucket"}, "is not rclone:REMOTE:path"),
        ({"pibackup-ship": "rclone:-vv:copy"}, "is not the name of a remote"),
        ({"pibackup-ship": "rclone:my cloud:copy"}, "is not the name of a remote"),
        ({"pibackup-ship": "rclone:cloud:a/../b"}, "contains '..'"),
        ({"pibackup-ship": "rclone:cloud:-copy"}, "starts with '-'"),
        ({"pibackup-ship": "rclone:cloud:a b"}, "characters that are not allowed"),
        ({"pibackup-ship": "rclone:cloud:copy"}, "pibackup keygen"),
        ({"pibackup-ship": "rclone:cloud:copy", "pibackup-ship-allow-plaintext": "maybe"}, "give true or false"),
        ({"pibackup-ship": "rclone:cloud:copy", "pibackup-ship-identity": "/etc/hostname"}, "is for ssh targets"),
        ({"pibackup-ship": "rclone:cloud:copy", "pibackup-ship-port": 2222}, "is for ssh targets"),
        ({"pibackup-ship": "rclone:cloud:copy", "pibackup-ship-rclone-config": "rclone.conf"}, "relative path"),
        ({"pibackup-ship": "pi@host:/srv/pb", "pibackup-ship-rclone-config": "/etc/hostname"}, "is for rclone:REMOTE:path targets"),
        ({"pibackup-ship": "pi@host:/srv/pb", "pibackup-ship-allow-plaintext": "true"}, "is for rclone:REMOTE:path targets"),
        ({"pibackup-ship-allow-plaintext": "true"}, "but pibackup-ship is not"),
    ],
)
def test_bad_rclone_ship_options_are_refused_with_a_message(options, message):
    opts = {"pibackup-ship-allow-plaintext": "false", "pibackup-ship-port": 22, **options}
    if "keygen" not in message and "pibackup-ship-allow-plaintext" not in options:
        opts["pibackup-ship-allow-plaintext"] = "true"  # the option under test, not the missing key
    with pytest.raises((ConfigError, PibackupError)) as e:
        parse_ship(opts)
    assert message in str(e.value), str(e.value)
