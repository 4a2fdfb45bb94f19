import os
import socket
import sys
import tarfile
from pathlib import Path
from typing import Callable, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import driver  # noqa: E402
from helpers import cli  # noqa: E402
from sshd import Sshd  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "long: the large runs of `make test-long`")


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    d = tmp_path / "usb" / "pibackup"
    d.mkdir(parents=True)
    return d


@pytest.fixture
def make_node(tmp_path: Path, dest: Path) -> Iterator[Callable[..., driver.Node]]:
    nodes = []

    def make(**options: object) -> driver.Node:
        # The tests' destinations share the disk with the live database; tests/e2e/test_traps.py
        # checks the warning that gives.
        opts = {"pibackup-destination": str(dest), "pibackup-segment-size": "128K", "pibackup-allow-same-medium": "true"}
        opts.update({k.replace("_", "-"): v for k, v in options.items()})  # pibackup_x or "pibackup-x"
        n = driver.Node(tmp_path / f"node{len(nodes)}", opts)
        nodes.append(n)
        return n

    yield make
    for n in nodes:
        if n.plugin is not None:
            n.plugin.proc.kill()
            n.plugin.proc.wait()
        n.live.close()


@pytest.fixture(scope="session")
def traces() -> dict:
    # Without the recordings only the tests that replay them are skipped (tests/unit needs none);
    # the tests parametrized over driver.trace_names() collect to an empty set.
    if not driver.TRACES.is_dir():
        pytest.skip(f"recordings not found at {driver.TRACES}; set PIBACKUP_TRACES")
    return {name: driver.load_trace(name) for name in driver.trace_names()}


def kill_points() -> int:
    return int(os.environ.get("PIBACKUP_KILL_POINTS", "20"))


@pytest.fixture
def notify_socket(tmp_path: Path):
    path = tmp_path / "notify.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.settimeout(10)
    yield s, str(path)
    s.close()


@pytest.fixture
def leds(tmp_path: Path) -> Path:
    root = tmp_path / "leds"
    act = root / "ACT"
    act.mkdir(parents=True)
    (act / "trigger").write_text("none timer [mmc0] heartbeat\n")
    (act / "brightness").write_text("0\n")
    (act / "max_brightness").write_text("255\n")
    return root


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    """A real sshd on 127.0.0.1 for the shipping tests, stopped at the end."""
    s = Sshd(tmp_path / "sshd")
    yield s
    s.close()


@pytest.fixture
def keyfile(tmp_path: Path) -> Path:
    """An encryption key made by `pibackup keygen`, as a user makes one."""
    k = tmp_path / "ship.key"
    r = cli("keygen", str(k))
    assert r.returncode == 0, r.stderr
    return k


@pytest.fixture
def old_backups(tmp_path: Path) -> Path:
    """Backups written by the first format's release, one per mode, with the live databases
    they were taken from (tests/fixtures/make_old_backups.py made them)."""
    with tarfile.open(Path(__file__).resolve().parent / "fixtures" / "backups-format1.tar.xz") as t:
        t.extractall(tmp_path / "old", filter="tar")
    return tmp_path / "old"
