"""Leaving at lightningd's stop, once its last writes are over.

After its shutdown notification lightningd still commits a few transactions, and it kills a
plugin that has not exited 30 s after the notification (committing its last ones without it).
It never closes the plugin's stdin first, so pyln-client's loop stays blocked reading it.
Leaving once no db_write came for QUIET_SECONDS follows what was seen with Core Lightning v26:
answering for about 2 s after the notification lost no transaction in 14 stops, while
waiting for stdin to close only made every stop take 30 s and ended in a kill. A transaction
that still came later shows as a gap at the next start and is repaired from the live
database, as any gap is.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

QUIET_SECONDS = 2.0
LIMIT_SECONDS = 25.0  # below lightningd's 30 s


class CallGate:
    """Held while a db_write is handled, so leaving never cuts one in half; remembers when
    the last one came."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last_call = time.monotonic()

    def __enter__(self) -> CallGate:
        self.lock.acquire()
        self.last_call = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.lock.release()

    def leave_when_quiet(self, close: Callable[[], None], leave: Callable[[int], None], log: Callable[[str, str], None]) -> None:
        """In a thread of its own: once no call came for QUIET_SECONDS (or LIMIT_SECONDS
        passed), close the backup and end the process with `leave`."""
        deadline = time.monotonic() + LIMIT_SECONDS
        while True:
            with self.lock:
                now = time.monotonic()
                if now - self.last_call >= QUIET_SECONDS or now >= deadline:
                    log("no more writes from lightningd; the backup is closed and pibackup exits", "info")
                    close()
                    leave(0)
                    return
            time.sleep(0.1)
