"""Where a copy goes: the [user@]host:/path target and the local files ssh reads, checked
so that nothing in them can reach a shell or look like an option (no subprocess here).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Union

from pibackup.copies.crypt import Key
from pibackup.errors import PibackupError

_USER = re.compile(r"^[A-Za-z_][A-Za-z0-9._-]{0,31}$")
_HOST = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])$")
_SPEC = re.compile(r"^(?:(?P<user>[^@:\[\]]*)@)?(?P<host>\[[^\]]*\]|[^:@]*):(?P<path>.*)$", re.S)
_RPATH = re.compile(r"^[A-Za-z0-9._/+,=@%~-]+$")
_LOCALPATH = re.compile(r"^/[A-Za-z0-9._/+,=@%~-]+$")  # passed inside rsync's -e string


class ShipError(PibackupError):
    pass


@dataclass(frozen=True)
class Target:
    user: Optional[str]
    host: str
    path: str

    @property
    def login(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    def __str__(self) -> str:
        return f"{self.login}:{self.path}"


@dataclass(frozen=True)
class RcloneTarget:
    """rclone:REMOTE:path, a remote of the user's rclone config (rclone_target.py checks it)."""

    remote: str
    path: str

    @property
    def root(self) -> str:
        """The copy's directory as rclone names it."""
        return f"{self.remote}:{self.path}"

    def __str__(self) -> str:
        return f"rclone:{self.root}"


def parse_target(spec: str, option: str = "pibackup-ship") -> Target:
    """[user@]host:/path, checked so that nothing in it can reach a shell or look like an option."""
    example = f"e.g. {option}=pi@backup.example.org:/srv/pibackup/mynode"
    if any(ord(c) < 32 or ord(c) == 127 for c in spec):
        raise ShipError(f"{option} contains control characters; write it as [user@]host:/path ({example})")
    m = _SPEC.match(spec)
    if not m or not m.group("host") or not m.group("path"):
        raise ShipError(f"{option}={spec!r} is not [user@]host:/path ({example})")
    user, host, path = m.group("user") or "", m.group("host"), m.group("path")
    if user and not _USER.match(user):
        raise ShipError(f"{option}: user name {user!r} has characters that are not allowed (letters, digits, . _ -)")
    if not _HOST.match(host):
        raise ShipError(
            f"{option}: host {host!r} is not a plain host name or address (letters, digits, . -; IPv6 in brackets)"
        )
    if not _RPATH.match(path):
        raise ShipError(
            f"{option}: remote path {path!r} has characters that are not allowed (spaces, quotes, $, ;, *, ... "
            "would pass through the remote shell); use letters, digits and . _ - / + , = @ % ~"
        )
    if path.startswith("-"):
        raise ShipError(f"{option}: remote path {path!r} starts with '-'; give the directory's real path")
    parts = path.split("/")
    if ".." in parts:
        raise ShipError(f"{option}: remote path {path!r} contains '..'; give the directory's real path")
    if path.rstrip("/") in ("", "~", ".") or path.strip("/") in ("", "~"):
        raise ShipError(f"{option}: give a directory of its own for the copy, not {path!r} ({example})")
    return Target(user or None, host, path.rstrip("/"))


def check_local_file(option: str, path: str) -> str:
    """A file ssh reads (identity, known_hosts): absolute, readable, and passable to rsync's -e."""
    if not _LOCALPATH.match(path):
        raise ShipError(
            f"{option}={path!r}: give an absolute path made of letters, digits and . _ - / + , = @ % ~ "
            "(rsync passes it to ssh in one string: no spaces or quotes)"
        )
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise ShipError(f"{option}: cannot read {path}: {e.strerror}") from e
    return path


@dataclass(frozen=True)
class ShipConfig:
    target: Union[Target, RcloneTarget]
    port: int
    identity: Optional[str]
    known_hosts: Optional[str]
    interval: float
    warn_after: float
    key: Optional[Key]
    rclone_config: Optional[str] = None  # rclone targets: its config file; None: rclone's own
