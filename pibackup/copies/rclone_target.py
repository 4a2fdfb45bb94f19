"""An rclone copy's address (rclone:REMOTE:path), the rclone command line every call starts
with (small on a Pi), and what rclone's failures mean for a Pi owner, in one line.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import List, Mapping, Optional

from pibackup.copies.crypt import Key
from pibackup.copies.target import RcloneTarget, ShipConfig, ShipError

RCLONE_PREFIX = "rclone:"
RCLONE_IO_TIMEOUT = 120  # seconds without progress before rclone gives up (rsync's too)
# A remote's name as `rclone config` makes it, without what could look like an option or a
# connection string (":s3,key=...:" would put secrets on the command line).
_REMOTE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+@-]{0,63}$")
_PATH = re.compile(r"^[A-Za-z0-9._/+,=@%~-]+$")
KEYGEN_HINT = (
    "make a key with: pibackup keygen /home/bitcoin/.lightning/pibackup.key (keep a copy away from the Pi), "
    "then set pibackup-ship-encrypt-key to it"
)

# Every call: one transfer at a time, no read-ahead buffers, buffers from mmap (returned to
# the system at once instead of waiting for Go's garbage collector), the smallest multipart
# chunks the big backends take, one upload stream each, no multi-stream downloads. Never a
# prompt (there is no terminal), no progress lines, and failures left to the round's backoff.
SMALL_FLAGS = [
    "--transfers=1",
    "--checkers=1",
    "--buffer-size=0",
    "--use-mmap",
    "--multi-thread-streams=0",
    "--s3-upload-concurrency=1",
    "--s3-chunk-size=5Mi",  # S3's smallest part; a buffer of this per upload, only above 200 MiB
    "--b2-chunk-size=5Mi",  # B2's smallest part (its default is 96 MiB per buffer)
    "--dropbox-chunk-size=8Mi",  # its default is 48 MiB, held in memory per upload
    "--ask-password=false",
    "--stats=0",
    "--retries=1",
    "--low-level-retries=3",
    "--contimeout=20s",
    f"--timeout={RCLONE_IO_TIMEOUT}s",
]


# Retention deletes for good: B2 would otherwise only hide the files and Drive move them to its
# trash, both still stored (and paid for) after the generation left the local backup.
DELETE_FLAGS = ["--b2-hard-delete", "--drive-use-trash=false"]


def is_rclone_spec(spec: str) -> bool:
    return spec.startswith(RCLONE_PREFIX)


def parse_rclone_target(spec: str, option: str = "pibackup-ship") -> RcloneTarget:
    """rclone:REMOTE:path, checked so that nothing in it can look like an option, a
    connection string or a way out of the copy's own directory."""
    example = f"e.g. {option}=rclone:mycloud:pibackup/mynode"
    if any(ord(c) < 32 or ord(c) == 127 for c in spec):
        raise ShipError(f"{option} contains control characters; write it as rclone:REMOTE:path ({example})")
    rest = spec[len(RCLONE_PREFIX) :] if is_rclone_spec(spec) else spec
    remote, sep, path = rest.partition(":")
    if not sep or not remote:
        raise ShipError(f"{option}={spec!r} is not rclone:REMOTE:path, REMOTE being a remote of your rclone config ({example})")
    if not _REMOTE.match(remote):
        raise ShipError(
            f"{option}: {remote!r} is not the name of a remote of your rclone config (letters, digits, _ . + @ -; "
            "`rclone listremotes` shows them). Connection strings are not taken: they would put secrets on a command line"
        )
    path = path.rstrip("/")
    if not path or path.strip("/") in ("", ".", "~"):
        raise ShipError(f"{option}: give a directory of its own for the copy after {remote}: ({example})")
    if not _PATH.match(path):
        raise ShipError(
            f"{option}: path {path!r} has characters that are not allowed (spaces, quotes, :, *, ...); "
            "use letters, digits and . _ - / + , = @ % ~"
        )
    if path.startswith("-") or ".." in path.split("/"):
        raise ShipError(f"{option}: path {path!r} starts with '-' or contains '..'; give the directory's real path")
    return RcloneTarget(remote, path)


def check_config_file(option: str, path: str) -> str:
    """An rclone config file given by name: absolute and readable now (rclone reads it at
    every call; what is in it is rclone's business, and its complaints are explained)."""
    if not path.startswith("/"):
        raise ShipError(f"{option}={path} is a relative path; give an absolute path")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise ShipError(f"{option}: cannot read {path}: {e.strerror}. Create it with: rclone --config {path} config") from e
    return path


def rclone_ship_config(
    spec: str, given: Mapping[str, Optional[str]], interval: float, warn_after: float, key: Optional[Key]
) -> ShipConfig:
    """The ShipConfig of an rclone target from the options the owner set (`given`: name ->
    value, only those not at their default)."""
    target = parse_rclone_target(spec)
    for name in ("pibackup-ship-port", "pibackup-ship-identity", "pibackup-ship-known-hosts"):
        if given.get(name) is not None:
            raise ShipError(
                f"{name} is for ssh targets; rclone logs in as its config says (remote {target.remote}): remove {name}"
            )
    if shutil.which("rclone") is None:
        raise ShipError(f"pibackup-ship={spec} needs rclone, which is not on lightningd's PATH: apt install rclone")
    plaintext = (given.get("pibackup-ship-allow-plaintext") or "false").lower()
    if plaintext not in ("true", "false"):
        raise ShipError(f"pibackup-ship-allow-plaintext={plaintext!r}: give true or false (default false)")
    if key is None and plaintext != "true":
        raise ShipError(
            f"pibackup-ship={spec} would put the node's database in plain text on someone else's storage: {KEYGEN_HINT}. "
            "(To ship it unencrypted anyway, set pibackup-ship-allow-plaintext=true.)"
        )
    config = given.get("pibackup-ship-rclone-config")
    return ShipConfig(
        target=target,
        port=0,
        identity=None,
        known_hosts=None,
        interval=interval,
        warn_after=warn_after,
        key=key,
        rclone_config=check_config_file("pibackup-ship-rclone-config", config) if config else None,
    )


def rclone_base(config: Optional[str]) -> List[str]:
    return ["rclone", *([f"--config={config}"] if config else []), *SMALL_FLAGS, *DELETE_FLAGS]


def config_name(config: Optional[str]) -> str:
    if config:
        return config
    return os.environ.get("RCLONE_CONFIG") or "rclone's own config (~/.config/rclone/rclone.conf of lightningd's user)"


_STAMP = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (?:[A-Z]+\s*: )?")


def last_error_line(stderr: str) -> str:
    lines = [_STAMP.sub("", line).strip() for line in stderr.strip().splitlines()]
    lines = [line for line in lines if line and "not found - using defaults" not in line]
    return lines[-1] if lines else ""


def explain_rclone_failure(code: int, stderr: str, target: RcloneTarget, config: Optional[str]) -> str:
    """One line that says what went wrong and what to do."""
    low = stderr.lower()
    cfg = config_name(config)
    remote = target.remote
    if "didn't find section in config file" in low:
        return (
            f"rclone has no remote named {remote!r} in {cfg}: create it with `rclone config` as lightningd's user, "
            "or point pibackup-ship-rclone-config at the file that has it (`rclone listremotes` shows the names)"
        )
    if "failed to load config file" in low or "could not parse line" in low:
        return f"rclone cannot read its config {cfg}: {last_error_line(stderr)}; fix it with `rclone config`"
    if "unable to decrypt configuration" in low or "configuration is encrypted" in low or "rclone_config_pass" in low:
        return (
            f"rclone's config {cfg} is encrypted and no password was given: set RCLONE_CONFIG_PASS in lightningd's "
            "environment (e.g. its systemd unit), or keep this remote in an unencrypted config of mode 600"
        )
    if "connection refused" in low:
        return f"{target} refuses connections: is its server running, and the address in remote {remote!r} right?"
    if "no such host" in low or "server misbehaving" in low or "temporary failure in name resolution" in low:
        return f"cannot resolve the server of remote {remote!r}: check its address, or the Pi's DNS"
    if "i/o timeout" in low or "deadline exceeded" in low or "no route to host" in low or "network is unreachable" in low:
        return f"the server of {target} does not answer (network down or host off)"
    if any(s in low for s in ("no space left", "insufficient storage", "quota", "storage full", "507 ", "not enough space",
                                "remaining disk space")):
        return f"the store of {target} is full (or over its quota): free space or raise the quota there"
    if any(s in low for s in ("nosuchbucket", "bucket does not exist", "bucket not found")):
        return f"the bucket of {target} does not exist: create it (e.g. rclone mkdir {remote}:{target.path.split('/')[0]})"
    if any(s in low for s in ("401", "403", "unauthorized", "forbidden", "access denied", "accessdenied", "permission denied",
                                "unable to authenticate", "invalid_grant", "token expired")):
        return (
            f"{target} refused rclone's login or access: check remote {remote!r} with `rclone lsd {remote}:` as "
            "lightningd's user (a token may need `rclone config reconnect`)"
        )
    line = last_error_line(stderr) or f"rclone exited with code {code}"
    return f"shipping to {target} failed: {line}"
