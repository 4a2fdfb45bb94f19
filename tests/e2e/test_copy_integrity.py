"""Shipped copies that cannot be rolled back or mixed without a reader saying so, and the
inputs that reach deletions, ssh and the disk checked first: the real rsync over a real sshd."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Tuple

import pytest
from test_ship import wait_in_step

import dbcompare
import driver
from driver import REPO
from helpers import cli, restore_to, tree_digest
from pibackup.copies.crypt import Encryptor, Key, load_key
from sshd import Sshd

STATE = Path(".ship") / "state.json"


def shipping_node(make_node, sshd: Sshd, remote: Path, keyfile, **extra) -> driver.Node:
    """64 KiB segments and no automatic compaction: the files a test cuts stay where it looks."""
    ship = sshd.options(remote, **({"pibackup_ship_encrypt_key": str(keyfile)} if keyfile else {}))
    return make_node(pibackup_batch_seconds=0, pibackup_segment_size="64K", pibackup_compact_ratio="0", **ship, **extra)


def run_in_rounds(node: driver.Node, recs, rounds: int) -> None:
    """The calls in `rounds` groups, each shipped by a round of its own (the open segment's
    encrypted copy then grows by one chunk a round)."""
    early = [r for r in recs if r.pre_init]
    node.start(early)
    rest = recs[len(early) :]
    step = max(1, len(rest) // rounds)
    for i in range(0, len(rest), step):
        node.calls(rest[i : i + step])
        wait_in_step(node, time.time())


def remote_cli(sshd: Sshd, command: str, remote: Path, *extra: str) -> subprocess.CompletedProcess:
    return cli(command, sshd.target(remote), *extra, *sshd.cli_args())


def assert_local_backup_holds_everything(dest: Path, node: driver.Node, tmp_path: Path) -> None:
    """Nothing acknowledged is lost: the backup medium restores to the live database."""
    out = tmp_path / f"local-{len(list(tmp_path.glob('local-*')))}.sqlite3"
    r = restore_to(dest, out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert dbcompare.backup_differences(node.live.path, out, ("utxoset",)) == []


def chunk_ends(data: bytes) -> List[int]:
    """Offsets where the chunks of an encrypted file end (a version 1 header is 36 bytes)."""
    out, pos = [], 36 if data[8] == 1 else 88
    while pos + 5 <= len(data):
        pos += 5 + int.from_bytes(data[pos + 1 : pos + 5], "little") + 16
        out.append(pos)
    return out


def test_a_newest_segment_cut_at_a_chunk_boundary_or_deleted_is_reported_older_than_its_records(
    sshd, keyfile, traces, make_node, dest, tmp_path
):
    remote = tmp_path / "remote"
    node = shipping_node(make_node, sshd, remote, keyfile)
    run_in_rounds(node, driver.first_run(traces["A"])[:320], rounds=12)
    node.stop()
    key = ("--key", str(keyfile))
    segs = sorted(remote.glob("gen-*/seg-*.pbj"))
    newest = segs[-1]
    assert len(segs) >= 2 and newest.name != "seg-000001.pbj", segs
    pristine = newest.read_bytes()
    ends = chunk_ends(pristine)
    assert len(ends) >= 2 and ends[-1] == len(pristine), "the newest segment must have grown over several rounds"

    ok = remote_cli(sshd, "verify", remote, *key)
    assert ok.returncode == 0 and "older than its own records" not in ok.stderr, ok.stdout + ok.stderr
    assert "newest transaction of this copy written at " in ok.stdout, ok.stdout

    # The host cuts the newest segment at a chunk boundary: every chunk left is authentic.
    newest.write_bytes(pristine[: ends[-2]])
    out = tmp_path / "cut.sqlite3"
    r = remote_cli(sshd, "restore", remote, str(out), *key)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "this copy is older than its own records say" in r.stderr and newest.name in r.stderr, r.stderr
    assert "Do NOT start lightningd on this database" in r.stderr
    v = remote_cli(sshd, "verify", remote, *key)
    assert v.returncode == 1 and "this copy is older than its own records say" in v.stderr, v.stdout + v.stderr

    # The host deletes the newest segment.
    newest.unlink()
    r = remote_cli(sshd, "restore", remote, str(tmp_path / "deleted.sqlite3"), *key)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"lacks {newest.name}" in r.stderr and "older than its own records say" in r.stderr, r.stderr

    newest.write_bytes(pristine)
    good = remote_cli(sshd, "restore", remote, str(tmp_path / "good.sqlite3"), *key)
    assert good.returncode == 0, good.stderr
    assert_local_backup_holds_everything(dest, node, tmp_path)


def test_a_generation_of_another_copy_under_the_same_key_is_refused_naming_both(sshd, keyfile, traces, make_node, dest, tmp_path):
    remote_a, remote_b = tmp_path / "remote-a", tmp_path / "remote-b"
    dest_b = tmp_path / "usb-b" / "pibackup"
    dest_b.mkdir(parents=True)
    a = shipping_node(make_node, sshd, remote_a, keyfile)
    b = shipping_node(make_node, sshd, remote_b, keyfile, pibackup_destination=str(dest_b))
    run_in_rounds(a, driver.first_run(traces["A"])[:200], rounds=2)
    run_in_rounds(b, driver.first_run(traces["filler-A"])[:120], rounds=2)
    a.stop()
    b.stop()

    # The host serves node B's whole generation (consistent in itself) as node A's.
    shutil.rmtree(remote_a / "gen-000001")
    shutil.copytree(remote_b / "gen-000001", remote_a / "gen-000001")
    out = tmp_path / "mixed.sqlite3"
    key = ("--key", str(keyfile))
    for command, args in (("restore", (str(out),)), ("verify", ())):
        r = remote_cli(sshd, command, remote_a, *args, *key)
        assert r.returncode == 1, r.stdout + r.stderr
        copy_a = (dest / ".ship" / "copy-id").read_text().strip()
        copy_b = (dest_b / ".ship" / "copy-id").read_text().strip()
        assert f"copy {copy_b}" in r.stderr and f"copy {copy_a}" in r.stderr, r.stderr
        assert "another copy were mixed in" in r.stderr, r.stderr
    assert not out.exists()
    assert_local_backup_holds_everything(dest, a, tmp_path)


@pytest.mark.parametrize("bad", ["*/x", "../x"])
def test_a_state_file_naming_paths_outside_the_layout_is_discarded_and_the_copy_sent_again(
    bad, sshd, traces, make_node, dest, tmp_path
):
    remote = tmp_path / "remote"
    node = shipping_node(make_node, sshd, remote, None)
    recs = driver.first_run(traces["A"])[:260]
    run_in_rounds(node, recs[:200], rounds=2)
    node.stop()
    remote_before = tree_digest(remote)
    local_before = {k: v for k, v in tree_digest(dest).items() if k.startswith("gen-")}
    state = json.loads((dest / STATE).read_text())
    # Sent and done: what an old generation's entries look like once retention removed it
    # locally, so that the next round would delete it remotely and drop its staging copies.
    state["files"][bad] = {"staged": 1, "staged_size": 1, "sent": True, "final": True, "done": True}
    (dest / STATE).write_text(json.dumps(state))

    node.start([])
    wait_in_step(node, time.time())
    local_after = tree_digest(dest)
    assert {k: local_after.get(k) for k in local_before} == local_before, "the local backup was touched"
    after = tree_digest(remote)
    assert set(remote_before) <= set(after), f"remote files deleted: {set(remote_before) - set(after)}"
    logged = [m for lvl, m in node.plugin.logs if lvl == "warn" and "state.json is not valid" in m]
    assert logged and repr(bad) in logged[0], node.plugin.log_text()
    assert any("holds this backup's copy" in m for _, m in node.plugin.logs), node.plugin.log_text()
    node.calls(recs[200:])
    wait_in_step(node, time.time())
    out = tmp_path / "after.sqlite3"
    r = remote_cli(sshd, "restore", remote, str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert dbcompare.backup_differences(node.live.path, out, ("utxoset",)) == []
    node.stop()
    assert_local_backup_holds_everything(dest, node, tmp_path)


def test_cli_ssh_values_ssh_would_read_as_options_are_refused_before_ssh_runs(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    ran = tmp_path / "ran"
    for tool in ("ssh", "rsync"):
        (fake / tool).write_text(f"#!/bin/sh\necho {tool} \"$@\" >> {ran}\nexit 12\n")
        (fake / tool).chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pibackup", *args], cwd=REPO, env=env, capture_output=True, text=True)

    ident = tmp_path / "id"
    ident.write_text("key\n")
    for bad, option in (
        ("--ssh-identity=-oProxyCommand=touch /tmp/pibackup-pwned", "--ssh-identity"),
        ("--known-hosts=-oProxyCommand=sh", "--known-hosts"),
        ("--ssh-identity=id with space", "--ssh-identity"),
        ("--ssh-port=-5", "--ssh-port"),
        ("--ssh-port=70000", "--ssh-port"),
        ("--ssh-port=22x", "--ssh-port"),
    ):
        for command in (["verify"], ["restore"]):
            r = run(*command, "pi@backup.example.org:/srv/copy", *(["out.sqlite3"] if command == ["restore"] else []), bad)
            assert r.returncode == 2, f"{bad}: {r.stdout}{r.stderr}"
            assert f"argument {option}: " in r.stderr, r.stderr
            assert not ran.exists(), f"{bad} reached {ran.read_text()}"
    # The same values, well formed, do reach rsync (the fake one): the check is no accident.
    r = run("verify", "pi@backup.example.org:/srv/copy", f"--ssh-identity={ident}", "--ssh-port=2222")
    assert r.returncode == 1 and ran.exists() and f"-i {ident}" in ran.read_text(), r.stderr


def test_a_fetch_takes_only_the_backup_layout_and_no_file_over_the_cap(sshd, traces, make_node, dest, tmp_path):
    from pibackup.copies.fetch import fetch

    remote = tmp_path / "remote"
    node = shipping_node(make_node, sshd, remote, None)
    run_in_rounds(node, driver.first_run(traces["A"])[:150], rounds=1)
    node.stop()
    layout = sorted(str(p.relative_to(remote)) for p in remote.rglob("*") if p.is_file())
    big = os.urandom(1 << 20) * 20
    for name in ("big.bin", "gen-000001/notes.bin", ".ship/x.pbj", "gen-000001.partial/seg-000001.pbj", "gen-1/seg-000001.pbj"):
        (remote / name).parent.mkdir(exist_ok=True)
        (remote / name).write_bytes(big)
    into = tmp_path / "fetched"
    into.mkdir()
    fetch(sshd.target(remote), str(into), sshd.port, sshd.identity, sshd.known_hosts)
    assert sorted(str(p.relative_to(into)) for p in into.rglob("*") if p.is_file()) == layout
    r = remote_cli(sshd, "restore", remote, str(tmp_path / "out.sqlite3"))
    assert r.returncode == 0, r.stdout + r.stderr

    # A file of the layout's name but over the cap: nothing is fetched, and the message says why.
    (remote / "gen-000002").mkdir()
    (remote / "gen-000002" / "seg-000001.pbj").write_bytes(big)
    r = remote_cli(sshd, "verify", remote, "--max-file-mb", "8")
    assert r.returncode == 1 and "gen-000002/seg-000001.pbj is 20 MiB, more than a backup file may be" in r.stderr, r.stderr
    assert "raise --max-file-mb" in r.stderr


def test_a_decrypted_copy_is_private_off_tmp_and_removed_when_the_cli_is_terminated(sshd, keyfile, traces, make_node, dest, tmp_path):
    remote = tmp_path / "remote"
    node = shipping_node(make_node, sshd, remote, keyfile)
    run_in_rounds(node, driver.first_run(traces["A"])[:150], rounds=1)
    node.stop()
    cache = tmp_path / "cache"
    work = cache / "pibackup"
    work.mkdir(parents=True)
    stale = work / "pibackup-plain-999999999-left"  # a run killed with SIGKILL: its process is gone
    stale.mkdir()
    (stale / "plain").write_text("x")
    env = dict(os.environ, XDG_CACHE_HOME=str(cache), PIBACKUP_TEST_STOP_IN_DECRYPT="1")
    cmd = [sys.executable, "-m", "pibackup", "verify", sshd.target(remote), "--key", str(keyfile), *sshd.cli_args()]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, status = os.waitpid(proc.pid, os.WUNTRACED)  # stops itself halfway through decrypting
        assert os.WIFSTOPPED(status), f"the CLI did not stop in the decryption: {proc.communicate()}"
        dirs = sorted(p.name for p in work.iterdir())
        assert not stale.exists(), dirs
        (plain,) = [work / n for n in dirs if n.startswith("pibackup-plain-")]
        assert [n for n in dirs if n.startswith("pibackup-fetch-")], dirs
        assert stat.S_IMODE(plain.stat().st_mode) == 0o700 and stat.S_IMODE(work.stat().st_mode) == 0o700
        assert not os.path.realpath(plain).startswith("/tmp/")
        assert list(plain.rglob("seg-*.pbj")), "some plaintext is there: the test caught it mid-way"
        os.kill(proc.pid, signal.SIGTERM)
        os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143 and "temporary files removed" in err, err
    assert list(work.iterdir()) == [], "a decrypted copy outlived the run"


def test_the_keys_repr_shows_no_secret(keyfile):
    key = load_key(str(keyfile))
    for text in (repr(key), str(key), repr([key])):
        assert key.secret.hex() not in text and repr(key.secret) not in text, text
        assert str(keyfile) in text


def _v1_copy(dest: Path, copy: Path, key: Key) -> List[Tuple[str, Path]]:
    """The backup encrypted as a pibackup before copy binding shipped it (format version 1)."""
    copy.mkdir()
    shutil.copyfile(dest / "PIBACKUP", copy / "PIBACKUP")
    out = []
    for p in sorted(dest.glob("gen-*/*")):
        if not (p.name.startswith("seg-") or p.name.startswith("snapshot-")):
            continue
        rel = str(p.relative_to(dest))
        (copy / rel).parent.mkdir(exist_ok=True)
        e = Encryptor(key, rel)
        (copy / rel).write_bytes(e.header + e.chunks(p.read_bytes(), final=True))
        out.append((rel, copy / rel))
    return out


def test_files_of_the_older_encrypted_format_still_restore_and_verify_calls_them_unbound(keyfile, traces, make_node, dest, tmp_path):
    node = make_node(pibackup_batch_seconds=0, pibackup_segment_size="64K")
    recs = driver.first_run(traces["A"])[:250]
    early = [r for r in recs if r.pre_init]
    node.start(early)
    node.calls(recs[len(early) :])
    node.stop()
    key = load_key(str(keyfile))
    files = _v1_copy(dest, tmp_path / "v1-copy", key)
    assert len(files) >= 2 and all(p.read_bytes()[8] == 1 for _, p in files)
    out = tmp_path / "from-v1.sqlite3"
    r = cli("restore", str(tmp_path / "v1-copy"), str(out), "--key", str(keyfile))
    assert r.returncode == 0, r.stdout + r.stderr
    assert dbcompare.backup_differences(node.live.path, out, ("utxoset",)) == []
    v = cli("verify", str(tmp_path / "v1-copy"), "--key", str(keyfile))
    assert v.returncode == 0, v.stdout + v.stderr
    assert f"{len(files)} file(s) of this copy are not bound to a copy" in v.stderr, v.stderr
