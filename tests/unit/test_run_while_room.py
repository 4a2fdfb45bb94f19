"""The fetch of a whole copy (rsync and rclone alike) runs through run_while_room."""

from __future__ import annotations

import sys

from pibackup.copies.transport import run_while_room


def test_its_exit_status_and_stderr_come_back():
    assert run_while_room(["sh", "-c", "echo no such host >&2; exit 3"], lambda: True) == (3, "no such host\n")


def test_a_command_that_writes_much_to_stderr_does_not_stall():
    # 1 MiB: far more than a pipe holds, which a pipe nobody reads would stall on.
    code = "import sys; sys.stderr.write('x' * (1 << 20))"
    done = run_while_room([sys.executable, "-c", code], lambda: True)
    assert done is not None and done[0] == 0 and len(done[1]) == 1 << 20


def test_it_is_ended_once_the_disk_it_fills_has_no_room():
    asked = []

    def still_room() -> bool:
        asked.append(1)
        return len(asked) < 3

    done = run_while_room(["sleep", "30"], still_room)
    assert done is None  # None only when still_room() stopped it, never a finished command
    assert len(asked) == 3
