"""Copies through the real rclone: its `local` backend, and `rclone serve sftp` and `rclone
serve webdav` on 127.0.0.1 standing in for a cloud; every copy restored and compared with
the live database, and every stored object checked for plaintext."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import pytest
from test_ship import wait_failing, wait_in_step

import dbcompare
import driver
from helpers import cli, restore_to
from pibackup.store.layout import is_layout_path
from sshd import free_port, keygen

CRYPT_MAGIC = b"PBKCRYPT"
# What a store must never see of a node's database: SQLite's header, the journal's magic,
# and SQL as lightningd writes it.
PLAINTEXT = (b"SQLite format 3", b"PIBKJRNL", b"CREATE TABLE", b"INSERT INTO", b"UPDATE ", b"DELETE FROM", b"node_id")

pytestmark = pytest.mark.skipif(shutil.which("rclone") is None, reason="rclone is not installed (make setup installs it)")


class RcloneServe:
    """`rclone serve sftp|webdav` of `root` on 127.0.0.1, with a user and a random password,
    stopped and started again on the same port at will."""

    def __init__(self, kind: str, root: Path, work: Path):
        self.kind, self.root, self.work = kind, root, work
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = secrets.token_hex(12)
        self.proc: Optional[subprocess.Popen] = None
        self.extra: List[str] = []
        if kind == "sftp":
            host_pub = keygen(work / f"{kind}_host_key")
            kind_, blob = host_pub.split()[:2]
            self.known_hosts = work / f"{kind}_known_hosts"
            self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {kind_} {blob}\n")
            self.extra = [f"--key={work / f'{kind}_host_key'}"]
        self.start()

    def start(self) -> None:
        cmd = ["rclone", "serve", self.kind, f"--addr=127.0.0.1:{self.port}", "--user=pibackup", f"--pass={self.password}"]
        cmd += ["--config=/dev/null", *self.extra, str(self.root)]  # a test's server; the password reaches no store
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(self.work / f"{self.kind}.log", "ab"))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError((self.work / f"{self.kind}.log").read_text())
                time.sleep(0.05)
        raise RuntimeError(f"rclone serve {self.kind} did not start listening")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait()
            self.proc = None

    def remote_section(self, name: str) -> str:
        obscured = subprocess.run(["rclone", "obscure", self.password], capture_output=True, text=True, check=True).stdout.strip()
        if self.kind == "sftp":
            return (
                f"[{name}]\ntype = sftp\nhost = 127.0.0.1\nport = {self.port}\nuser = pibackup\npass = {obscured}\n"
                f"known_hosts_file = {self.known_hosts}\nshell_type = none\n\n"
            )
        return f"[{name}]\ntype = webdav\nurl = http://127.0.0.1:{self.port}/\nvendor = other\nuser = pibackup\npass = {obscured}\n\n"


class Stores:
    """The three kinds of store and one rclone config naming them: remote `disk` (the local
    backend), `sftp` and `dav`. `where(kind)` is the directory on this machine a store's
    objects end up in."""

    def __init__(self, work: Path):
        self.work = work
        self.disk = work / "disk"
        self.disk.mkdir(parents=True)
        self.servers: Dict[str, RcloneServe] = {
            "sftp": RcloneServe("sftp", work / "sftp-root", work),
            "dav": RcloneServe("webdav", work / "dav-root", work),
        }
        self.config = work / "rclone.conf"
        text = "[disk]\ntype = local\n\n" + "".join(s.remote_section(n) for n, s in self.servers.items())
        self.config.write_text(text)
        self.config.chmod(0o600)

    def where(self, remote: str) -> Path:
        return self.disk if remote == "disk" else self.servers[remote].root

    def spec(self, remote: str, name: str) -> Tuple[str, Path]:
        """(rclone:REMOTE:path of a copy called `name`, the directory its objects land in)."""
        if remote == "disk":
            return f"rclone:disk:{self.disk / name}", self.disk / name
        return f"rclone:{remote}:{name}", self.where(remote) / name

    def close(self) -> None:
        for s in self.servers.values():
            s.stop()


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stores]:
    s = Stores(tmp_path_factory.mktemp("rclone"))
    yield s
    s.close()


def ship_options(stores: Stores, spec: str, keyfile: Optional[Path], **extra: object) -> Dict[str, object]:
    opts: Dict[str, object] = {
        "pibackup-ship": spec,
        "pibackup-ship-rclone-config": str(stores.config),
        "pibackup-ship-interval": 1,
        "pibackup-batch-seconds": 0,
        "pibackup-segment-size": "64K",
        "pibackup-compact-ratio": "0",
    }
    if keyfile is not None:
        opts["pibackup-ship-encrypt-key"] = str(keyfile)
    opts.update({k.replace("_", "-"): v for k, v in extra.items()})
    return opts


def cli_args(stores: Stores, keyfile: Optional[Path]) -> List[str]:
    return ["--rclone-config", str(stores.config)] + (["--key", str(keyfile)] if keyfile is not None else [])


def assert_copy_equals_live(stores: Stores, spec: str, node: driver.Node, tmp_path: Path, keyfile: Optional[Path]) -> None:
    out = tmp_path / f"from-store-{time.monotonic_ns()}.sqlite3"
    r = cli("restore", spec, str(out), *cli_args(stores, keyfile))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "newest transaction of this copy written at" in r.stdout and "WARNING" not in r.stderr, r.stdout + r.stderr
    assert dbcompare.backup_differences(node.live.path, out, ("utxoset",)) == []
    v = cli("verify", spec, *cli_args(stores, keyfile))
    assert v.returncode == 0 and "WARNING" not in v.stderr, v.stdout + v.stderr


def assert_no_plaintext(store: Path) -> None:
    objects = [p for p in store.rglob("*") if p.is_file()]
    assert objects, store
    for p in objects:
        data = p.read_bytes()
        if p.name == "PIBACKUP":
            assert data.startswith(b"pibackup backup directory\n"), p  # the marker: no secret, never encrypted
            continue
        if p.name == "HEAD" or ".part-" not in p.name:
            assert data.startswith(CRYPT_MAGIC), p
        for plain in PLAINTEXT:
            assert plain not in data, f"{p} shows {plain!r}: a store must learn nothing of the node"


def objects_of(store: Path) -> List[str]:
    return sorted(str(p.relative_to(store)) for p in store.rglob("*") if p.is_file())


@pytest.mark.parametrize("remote", ["disk", "sftp", "dav"])
def test_copies_in_each_kind_of_store_restore_equal_to_the_live_db(remote, stores, keyfile, traces, make_node, dest, tmp_path):
    spec, store = stores.spec(remote, f"equal-{tmp_path.name}")
    node = make_node(**ship_options(stores, spec, keyfile))
    recs = driver.first_run(traces["A"])[:400]
    early = [r for r in recs if r.pre_init]
    node.start(early)
    half = len(recs) // 2
    node.calls(recs[len(early) : half])
    wait_in_step(node, time.time())
    assert_copy_equals_live(stores, spec, node, tmp_path, keyfile)
    # The open segment grows in the store as part objects after its base.
    node.calls(recs[half : half + 20])
    wait_in_step(node, time.time())
    assert any(".part-" in name for name in objects_of(store)), objects_of(store)
    node.calls(recs[half + 20 :])
    st = wait_in_step(node, time.time())
    assert st["state"] == "ok" and st["encrypted"] is True and st["target"] == spec, st
    assert_copy_equals_live(stores, spec, node, tmp_path, keyfile)
    assert len(list(dest.glob("gen-*/seg-*.pbj"))) > 2, "the test must cover closed segments"

    # Closed files are single objects (their parts removed once the whole file was there);
    # only the newest segment may have parts.
    names = objects_of(store)
    newest = sorted(n for n in names if n.endswith(".pbj"))[-1]
    assert all(n.startswith(newest + ".part-") for n in names if ".part-" in n), names
    local = [str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file() and is_layout_path(str(p.relative_to(dest)))]
    assert sorted(n for n in names if ".part-" not in n) == sorted(local + ["HEAD"])
    assert_no_plaintext(store)
    r = cli("restore", spec, str(tmp_path / "nokey.sqlite3"), "--rclone-config", str(stores.config))
    assert r.returncode == 1 and "encrypted copy: give the key file with --key" in r.stderr, r.stderr
    node.stop()
    assert "error" not in [lvl for lvl, _ in node.all_logs], node.log_text()


def test_a_plaintext_copy_only_when_asked_for_and_it_restores(stores, traces, make_node, tmp_path):
    spec, store = stores.spec("disk", "plain")
    refused = make_node(**ship_options(stores, spec, None))
    recs = driver.first_run(traces["A"])[:200]
    early = [r for r in recs if r.pre_init]
    refused.start([])
    with pytest.raises(driver.Halted):
        refused.call(early[0])
    logged = refused.log_text()
    assert "would put the node's database in plain text on someone else's storage" in logged, logged
    assert "pibackup keygen" in logged and "pibackup-ship-allow-plaintext=true" in logged, logged
    assert not store.exists() and refused.live.version() is None

    node = make_node(**ship_options(stores, spec, None, pibackup_ship_allow_plaintext="true"))
    node.start(early)
    node.calls(recs[len(early) :])
    st = wait_in_step(node, time.time())
    assert st["encrypted"] is False
    assert_copy_equals_live(stores, spec, node, tmp_path, None)
    assert (store / "HEAD").read_bytes().startswith(b"{")
    node.stop()


def test_a_compaction_reaches_the_store_and_a_copy_caught_mid_round_restores_the_generation_before(
    stores, keyfile, traces, make_node, dest, tmp_path
):
    from test_compact import wait_compacted

    spec, store = stores.spec("disk", "compacted")
    node = make_node(**ship_options(stores, spec, keyfile))
    recs = driver.first_run(traces["A"])[:400]
    early = [r for r in recs if r.pre_init]
    node.start(early)
    node.calls(recs[len(early) : 250])
    wait_in_step(node, time.time())
    head_before = (store / "HEAD").read_bytes()
    node.rpc("pibackup-compact")
    wait_compacted(node, 1)
    node.calls(recs[250:])
    wait_in_step(node, time.time())
    assert sorted(p.name for p in store.glob("gen-*")) == ["gen-000001", "gen-000002"]
    assert_copy_equals_live(stores, spec, node, tmp_path, keyfile)
    node.stop()
    local = restore_to(dest, tmp_path / "gen1.sqlite3", "--generation", "1")
    assert local.returncode == 0, local.stderr

    # The store as a reader finds it in the round that began gen-000002: its snapshot is
    # there, its journal not yet, and the head record is the one before.
    caught = tmp_path / "caught"
    shutil.copytree(store, caught)
    for p in caught.glob("gen-000002/seg-*"):
        p.unlink()
    (caught / "HEAD").write_bytes(head_before)
    out = tmp_path / "caught.sqlite3"
    r = cli("restore", f"rclone:disk:{caught}", str(out), *cli_args(stores, keyfile))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "gen-000002 of this copy was still being shipped (no journal yet); using gen-000001" in r.stderr, r.stderr
    assert dbcompare.backup_differences(tmp_path / "gen1.sqlite3", out, ()) == []


def test_a_generation_leaves_the_store_only_after_the_newer_one_is_complete_there(stores, keyfile, traces, make_node, dest, tmp_path):
    spec, store = stores.spec("sftp", f"retention-{tmp_path.name}")
    node = make_node(**ship_options(stores, spec, keyfile, pibackup_segment_size="128K"))
    recs = driver.first_run(traces["A"])
    early = [r for r in recs if r.pre_init]
    node.start(early)
    node.calls(recs[len(early) : 40])
    wait_in_step(node, time.time())
    node.stop()
    node.commit_without_plugin(recs[40])  # lightningd ran without the plugin: a new generation
    stores.servers["sftp"].stop()  # the store is away while gen-000002 begins
    node.start([])
    node.calls(recs[41:60])
    shutil.rmtree(dest / "gen-000001")  # what retention does once gen-000002 is complete locally
    wait_failing(node, "refuses connections")
    assert sorted(p.name for p in store.glob("gen-*")) == ["gen-000001"], "nothing leaves the store before its successor is there"
    stores.servers["sftp"].start()
    wait_in_step(node, time.time())
    wait_in_step(node, time.time())  # the deletion comes in the round after the new head record
    assert sorted(p.name for p in store.glob("gen-*")) == ["gen-000002"]
    assert_copy_equals_live(stores, spec, node, tmp_path, keyfile)
    node.stop()


def test_no_secret_reaches_a_command_line(stores, keyfile, traces, make_node, tmp_path):
    # Every rclone the plugin starts goes through a wrapper that notes its arguments.
    spec, _ = stores.spec("sftp", f"argv-{tmp_path.name}")
    wrap = tmp_path / "bin"
    wrap.mkdir()
    calls = tmp_path / "argv.log"
    real = shutil.which("rclone")
    (wrap / "rclone").write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {calls}\nexec {real} "$@"\n')
    (wrap / "rclone").chmod(0o755)
    node = make_node(**ship_options(stores, spec, keyfile))
    node.plugin_env = {"PATH": f"{wrap}:{os.environ['PATH']}"}
    recs = driver.first_run(traces["A"])[:150]
    early = [r for r in recs if r.pre_init]
    node.start(early)
    node.calls(recs[len(early) :])
    wait_in_step(node, time.time())
    node.stop()
    lines = calls.read_text().splitlines()
    assert lines and all(line.startswith(f"--config={stores.config} ") for line in lines), lines[:3]
    secret = stores.servers["sftp"].password
    obscured = [line.split(" = ", 1)[1] for line in stores.config.read_text().splitlines() if line.startswith("pass = ")]
    key_lines = [k for k in keyfile.read_text().split() if len(k) >= 32]  # the key's secret, in hex
    assert key_lines
    for line in lines:
        assert secret not in line and not any(o in line for o in obscured + key_lines), line


def test_shipping_resumes_after_a_restart_without_sending_closed_files_again(stores, keyfile, traces, make_node, dest, tmp_path):
    spec, store = stores.spec("disk", f"resume-{tmp_path.name}")
    node = make_node(**ship_options(stores, spec, keyfile))
    recs = driver.first_run(traces["A"])[:400]
    early = [r for r in recs if r.pre_init]
    node.start(early)
    half = 300
    node.calls(recs[len(early) : half])
    wait_in_step(node, time.time())
    node.call(recs[half])
    wait_in_step(node, time.time())  # the open segment has a part now
    node.stop()
    names = objects_of(store)
    newest = sorted(n for n in names if n.endswith(".pbj"))[-1]
    closed = {n: (store / n).stat().st_mtime_ns for n in names if n.endswith((".pbj", ".sqlite3")) and n != newest}
    assert closed and any(".part-" in n for n in names), names
    node.start([])
    node.calls(recs[half + 1 :])
    wait_in_step(node, time.time())
    assert {n: (store / n).stat().st_mtime_ns for n in closed} == closed, "closed files were sent again"
    assert_copy_equals_live(stores, spec, node, tmp_path, keyfile)
    # The open segment started again under a new encryption: the parts of the old one are gone.
    tags = {n.split(".part-")[1].split("-")[0] for n in objects_of(store) if ".part-" in n}
    assert len(tags) <= 1, objects_of(store)
    node.stop()

