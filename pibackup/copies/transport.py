"""What a copy's host must do for the shipper and for a reader of the copy: the one
interface every way of reaching a host (rsync over ssh, rclone) implements in one file.
"""

from __future__ import annotations

import subprocess
import tempfile
from dataclasses import dataclass
from typing import IO, Callable, List, Optional, Protocol, Sequence, Tuple


@dataclass(frozen=True)
class RemoteEntry:
    """One name in the remote directory: `name` relative to it, `size` in bytes."""

    name: str
    size: int
    is_file: bool


class Transport(Protocol):
    """Every call raises ShipError with a line a Pi owner can act on when the host fails."""

    def describe(self) -> str:
        """The copy's address as the owner configured it ([user@]host:/path)."""

    def list(self, recursive: bool = False) -> Optional[List[RemoteEntry]]:
        """recursive=False: the names at the top of the remote directory, None when it does
        not exist yet (one login: it also tells whether the host is back). recursive=True:
        every file of the backup's layout and nothing else, with sizes (what a reader may
        fetch); a missing directory is an error then."""

    def send(self, root: str, rels: Sequence[str], append: bool, growing: bool = False) -> None:
        """Send root/rel for each rel to the same rel remotely, in name order. append: the
        remote holds a prefix of each; send the rest and check the whole file. Otherwise
        each is sent whole and replaces the remote one at once. growing: these files will
        grow further (the open segment's staging copy), so later sends append to them."""

    def fetch(self, rel: str, into: str, max_bytes: int) -> bool:
        """Copy one remote file into the directory `into`; False when the host could not
        give it (absent, unreadable, unreachable). One over max_bytes is skipped quietly."""

    def fetch_copy(self, into: str, max_file: int, still_room: Callable[[], bool]) -> bool:
        """Copy the backup layout's files (no file over max_file) into `into`; stop and
        return False as soon as still_room() says the disk there is filling."""

    def delete(self, generations: Sequence[str]) -> None:
        """Remove these generation directories (names checked by the caller) remotely."""

    def cancel(self) -> None:
        """From another thread: end the call under way; no new call starts afterwards."""


def run_while_room(
    args: Sequence[str], still_room: Callable[[], bool], stdin: Optional[IO[bytes]] = None
) -> Optional[Tuple[int, str]]:
    """Run a fetching command (rsync, rclone) while the disk it fills has room: (exit status,
    its stderr), or None when it was killed because still_room() said the disk is filling.
    stderr goes to a temporary file, not a pipe: a pipe nobody reads while the command runs
    would stall it once full. FileNotFoundError (the command is not installed) is the caller's."""
    with tempfile.TemporaryFile() as errors:
        source = stdin if stdin is not None else subprocess.DEVNULL
        proc = subprocess.Popen(args, stdin=source, stdout=subprocess.DEVNULL, stderr=errors)
        try:
            while True:
                try:
                    proc.wait(0.2)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if not still_room():
                    return None
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        errors.seek(0)
        return proc.returncode, errors.read().decode(errors="replace")
