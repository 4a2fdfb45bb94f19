"""The pibackup-remote-* options as the sender uses them, checked: the target, how ssh reaches
it, the command run there, how long a critical transaction may wait, and what a failure does.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

from pibackup.copies.crypt import Key
from pibackup.copies.target import ShipError, Target, parse_target

HALT, CONTINUE_DEGRADED = "halt", "continue-degraded"
POLICIES = (HALT, CONTINUE_DEGRADED)
_WORD = re.compile(r"^[A-Za-z0-9._/+,=@%~:-]+$")


class RemoteConfigError(ShipError):
    pass


@dataclass(frozen=True)
class RemoteConfig:
    target: Target
    port: int
    identity: Optional[str]
    known_hosts: Optional[str]
    command: Tuple[str, ...]  # run on the remote host, DIR appended
    timeout: float  # seconds a critical transaction may wait for the remote's acknowledgement
    on_failure: str
    key: Optional[Key]

    def remote_command(self) -> List[str]:
        return [*self.command, self.target.path]


def parse_command(raw: str) -> Tuple[str, ...]:
    """The command that starts the receiver: words of safe characters, nothing a remote shell
    would interpret (ssh hands the words to the remote user's shell, joined by blanks)."""
    words = raw.split()
    if not words:
        raise RemoteConfigError("pibackup-remote-command is empty; the default is: pibackup serve")
    for w in words:
        if not _WORD.match(w):
            raise RemoteConfigError(
                f"pibackup-remote-command: {w!r} has characters a remote shell would interpret (spaces, quotes, $, ;, *, ...); "
                "use plain words, e.g. pibackup serve --append-only"
            )
    if words[0].startswith("-"):
        raise RemoteConfigError(f"pibackup-remote-command starts with {words[0]!r}: give the command, e.g. pibackup serve")
    return tuple(words)


def parse_remote(spec: str) -> Target:
    return parse_target(spec, "pibackup-remote")


def parse_policy(raw: str) -> str:
    value = raw.strip().lower()
    if value not in POLICIES:
        raise RemoteConfigError(f"pibackup-remote-on-failure={raw!r}: give halt or continue-degraded")
    return value


def parse_remotes(
    specs: Any,
    port: int,
    identity: Optional[str],
    known_hosts: Optional[str],
    command: str,
    timeout: int,
    on_failure: str,
    key_file: Optional[str],
) -> Tuple[RemoteConfig, ...]:
    """Every pibackup-remote target with the settings they share; () when none is given."""
    from pibackup.copies.crypt import load_key
    from pibackup.copies.target import check_local_file

    values = specs if isinstance(specs, list) else [specs]
    targets = [parse_remote(str(v).strip()) for v in values if v is not None and str(v).strip().lower() not in ("", "none")]
    if not targets:
        return ()
    if len({str(t) for t in targets}) < len(targets):
        raise RemoteConfigError("pibackup-remote names the same host and directory twice; give each once")
    if shutil.which("ssh") is None:
        raise RemoteConfigError("pibackup-remote needs ssh, which is not on lightningd's PATH: apt install openssh-client")
    if key_file is not None and not key_file.startswith("/"):
        raise RemoteConfigError(f"pibackup-remote-encrypt-key={key_file} is a relative path; give an absolute path")
    return tuple(
        RemoteConfig(
            target=t,
            port=port,
            identity=check_local_file("pibackup-remote-identity", identity) if identity else None,
            known_hosts=check_local_file("pibackup-remote-known-hosts", known_hosts) if known_hosts else None,
            command=parse_command(command),
            timeout=float(timeout),
            on_failure=parse_policy(on_failure),
            key=load_key(key_file) if key_file else None,
        )
        for t in targets
    )
