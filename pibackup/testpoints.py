"""Points where the tests make the plugin fail on purpose; inert unless their environment variables are set."""

from __future__ import annotations

import errno
import os
import signal

# A test can make the plugin or its child SIGKILL itself at one named step, to prove every
# step crash-safe (tests/e2e/test_compact.py); unset in production.
CRASH_ENV = "PIBACKUP_TEST_CRASH"


def crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


# Tests only: with PIBACKUP_TEST_FAULT=FILE, while FILE exists, the points named in it (one
# word each) fail with EIO, as a failing medium's would. Unset (always, outside the tests),
# fault_point costs one comparison.
_FAULT_FILE = os.environ.get("PIBACKUP_TEST_FAULT")


def fault_point(name: str, path: str = "") -> None:
    if _FAULT_FILE is None:
        return
    try:
        with open(_FAULT_FILE, encoding="utf-8") as f:
            armed = f.read().split()
    except FileNotFoundError:
        return
    if name in armed:
        raise OSError(errno.EIO, os.strerror(errno.EIO), path or None)
