"""Fetching a shipped copy from its host: only the backup layout's files, none over the cap,
and never more than the free space where it lands (a host cannot fill a reader's disk).
"""

from __future__ import annotations

import os
from typing import Optional

from pibackup.copies.rsync import RsyncTransport
from pibackup.copies.target import ShipError, parse_target
from pibackup.copies.transport import Transport

MAX_FILE_DEFAULT = 16 << 30  # a segment is at most ~1 GiB; a node's database (snapshot) rarely nears this
FREE_RESERVE = 64 << 20  # what a fetch or a decryption leaves free where it writes


def is_remote(spec: str) -> bool:
    """host:/path or user@host:path, and not a local path that happens to hold a colon."""
    return ":" in spec and not spec.startswith(("/", ".", "~")) and not os.path.exists(spec)


def _free(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.0f} MiB"


def fetch(
    spec: str,
    into: str,
    port: int,
    identity: Optional[str],
    known_hosts: Optional[str],
    max_file: int = MAX_FILE_DEFAULT,
    rclone_config: Optional[str] = None,
) -> None:
    """Copy the backup files of a remote copy into `into`: only the layout's names, no file
    over `max_file` bytes, and never more than the free space there (checked on the
    listing first, and watched while the files arrive)."""
    if spec.startswith("rclone:"):
        from pibackup.copies.rclone import RcloneTransport
        from pibackup.copies.rclone_target import parse_rclone_target

        fetch_from(RcloneTransport(parse_rclone_target(spec, option="the remote copy"), rclone_config), into, max_file)
        return
    target = parse_target(spec, option="the remote copy")
    fetch_from(RsyncTransport(target, port, identity, known_hosts), into, max_file)


def fetch_from(transport: Transport, into: str, max_file: int = MAX_FILE_DEFAULT) -> None:
    target = transport.describe()
    try:
        listed = transport.list(recursive=True) or []
    except ShipError as e:
        raise ShipError(f"cannot fetch {target}: {e}") from e
    total = 0
    for entry in listed:
        size, name = entry.size, entry.name
        if size > max_file:
            raise ShipError(
                f"{target}/{name} is {_mib(size)}, more than a backup file may be ({_mib(max_file)}): it was not made by "
                "pibackup, or the copy was altered. Nothing was fetched; if it is genuine, raise --max-file-mb"
            )
        total += size
    room = _free(into) - FREE_RESERVE
    if total > room:
        raise ShipError(
            f"the copy at {target} is {_mib(total)}; {into} has room for {_mib(max(0, room))} only (keeping "
            f"{_mib(FREE_RESERVE)} free). Nothing was fetched: free space there, or restore to another disk"
        )
    try:
        # The host may serve more than it listed: the copy stops when the disk fills.
        complete = transport.fetch_copy(into, max_file, lambda: _free(into) >= FREE_RESERVE)
    except ShipError as e:
        raise ShipError(f"cannot fetch {target}: {e}") from e
    if not complete:
        raise ShipError(
            f"fetching {target} filled {into} beyond what its listing said ({_mib(total)}): the copy is growing "
            "or was altered. The fetch was stopped and its files removed"
        )
