"""The board LED without root: sysfs makes an LED's files root's, 0644. As an unprivileged
user (nobody, standing for lightningd's `bitcoin`) the plugin's warning says what to run; once
the package's udev rule has handed the files to a group the user is in, the user drives it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import pytest

from driver import REPO

RULE = REPO / "packaging" / "debian" / "pibackup.udev"
# The system's python3: the test venv's interpreter may live where nobody cannot read it.
PYTHON = shutil.which("python3", path="/usr/bin:/bin") or "python3"

# Runs as the unprivileged user: one status check with the LED, the log lines it made.
DRIVE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from pibackup.app.status import Led, Reporter
logs = []
r = Reporter(lambda m, lvl: logs.append([lvl, m]), dict, lambda: [], 0, led=Led("ACT", sys.argv[2]))
r.check()
print(json.dumps(logs))
"""


@pytest.fixture
def root_leds() -> Iterator[Path]:
    """A stand-in for /sys/class/leds as sysfs has it: root's files, mode 0644, in a tree any
    user can reach (pytest's own temporary directories are 0700)."""
    if os.geteuid() != 0:
        pytest.skip("a root-owned stand-in LED tree and a switch to user nobody need root")
    top = Path(tempfile.mkdtemp(prefix="pibackup-leds-"))
    top.chmod(0o755)
    act = top / "ACT"
    act.mkdir()
    (act / "trigger").write_text("none timer [mmc0] heartbeat\n")
    (act / "brightness").write_text("0\n")
    (act / "max_brightness").write_text("255\n")
    for f in act.iterdir():
        f.chmod(0o644)
    yield top
    shutil.rmtree(top)


def drive_as_nobody(leds: Path, group: Optional[str] = None) -> List[Tuple[str, str]]:
    r = subprocess.run(
        [PYTHON, "-I", "-c", DRIVE, str(REPO), str(leds)],
        user="nobody",
        group=group or "nogroup",
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return [tuple(x) for x in json.loads(r.stdout)]


def rule_command(led_dir: Path, group: str) -> str:
    """The shell command the package's udev rule runs for an LED, aimed at a stand-in LED and
    a group of this machine (the package's own group exists only where it is installed)."""
    m = re.search(r"""RUN\+="/bin/sh -c '(.*)'"$""", RULE.read_text(), re.M)
    assert m, f"no RUN command in {RULE}"
    return m.group(1).replace("/sys%p", str(led_dir)).replace("$$", "$").replace("chgrp pibackup-led", f"chgrp {group}")


def test_a_root_owned_led_warns_with_the_command_that_fixes_it(root_leds):
    logs = drive_as_nobody(root_leds)
    warnings = [m for lvl, m in logs if lvl == "warn"]
    assert len(warnings) == 1, logs
    w = warnings[0]
    assert "permission denied" in w and "sudo adduser nobody pibackup-led" in w, w
    assert "restart lightningd" in w, w
    assert (root_leds / "ACT" / "trigger").read_text().startswith("none timer [mmc0]"), "nothing was written"


def test_the_udev_rule_hands_the_led_to_its_group_and_the_user_drives_it(root_leds):
    act = root_leds / "ACT"
    subprocess.run(["/bin/sh", "-c", rule_command(act, "nogroup")], check=True)
    for name in ("trigger", "brightness"):
        st = (act / name).stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, 65534, 0o664), (name, st)
    assert (act / "max_brightness").stat().st_mode & 0o777 == 0o644, "only what the plugin writes is handed over"
    logs = drive_as_nobody(root_leds, group="nogroup")
    assert [m for lvl, m in logs if lvl == "warn"] == [], logs
    assert (act / "trigger").read_text() == "heartbeat"


def test_the_rule_lets_the_timer_files_through_when_they_appear(root_leds):
    """The timer trigger's delay_on and delay_off appear later, root's: the rule's "change"
    run hands them over too."""
    act = root_leds / "ACT"
    for name in ("delay_on", "delay_off"):
        (act / name).write_text("500\n")
        (act / name).chmod(0o644)
    assert 'ACTION=="add|change"' in RULE.read_text()
    subprocess.run(["/bin/sh", "-c", rule_command(act, "nogroup")], check=True)
    for name in ("delay_on", "delay_off"):
        assert (act / name).stat().st_mode & 0o777 == 0o664 and (act / name).stat().st_gid == 65534
