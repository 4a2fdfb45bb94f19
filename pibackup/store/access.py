"""Whether a backup directory may be used: its marker, the configured path, and who owns what in it.

Another local user's file in a backup directory (planted where they could write) must never
be restored from; a directory others can write to is worth a warning. A FAT or exFAT stick
has no permissions: it shows every file 0777 with one owner, the mount's, and must go on
working (with the warning).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import List, Optional

from pibackup.errors import PibackupError
from pibackup.store.layout import FS_ARTIFACTS, GENERATION_RE, LOCK_DIR, MARKER, MARKER_TMP

# Format 2: snapshots are compressed (store/snapfile.py). A format 1 backup is read as it is,
# and its next writer makes it format 2 before it writes anything else (directory.prepare).
MARKER_TEXT = "pibackup backup directory\nformat 2\n"
MARKER_FORMATS = {"format 1": "pibackup backup directory\nformat 1\n", "format 2": MARKER_TEXT}


class DestinationError(PibackupError):
    """The backup directory cannot be used as it is."""


def read_only_fs(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


@dataclass(frozen=True)
class Problem:
    """Something about who may change a backup directory: `foreign` (owned by another user:
    the backup is not used) or a directory others can write to (a warning)."""

    path: str
    foreign: bool
    message: str


_SCAN_DEPTH = 3  # DEST, its generations (and the lock and shipping directories), what they hold


def access_problems(path: str) -> List[Problem]:
    """Who owns what in the backup directory `path`, and who may write to it.

    Everything in it must belong to the directory's owner or to root: anything else was put
    there by another local user (in a directory they could write to) and is refused. A
    directory that its group or other users can write to is a warning only: a FAT or exFAT
    stick shows every file that way with one owner, and must go on working."""
    try:
        top = os.stat(path)
    except OSError:
        return []  # validate and check_marker say what is wrong with it
    trusted = {top.st_uid, 0}
    foreign: List[str] = []
    read_only = read_only_fs(path)  # then nobody writes, whatever the modes say
    writable: List[str] = [path] if top.st_mode & 0o022 and not read_only else []

    def scan(d: str, depth: int) -> None:
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError:
            return  # unreadable to this user: reading it later fails with its own message
        for e in entries:
            if depth == 1 and e.name in FS_ARTIFACTS:
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue  # removed meanwhile (retention, a compaction's rename)
            if st.st_uid not in trusted:
                foreign.append(e.path)
                continue  # nothing in it is used either
            if stat.S_ISDIR(st.st_mode):
                if st.st_mode & 0o022 and not read_only:
                    writable.append(e.path)
                if depth < _SCAN_DEPTH:
                    scan(e.path, depth + 1)

    scan(path, 1)
    out = []
    owner = _name(top.st_uid)
    for p in foreign:
        out.append(
            Problem(
                p,
                True,
                f"{p} belongs to user {_owner(p)}, not to {owner} who owns the backup directory {path} (nor to root): "
                "another local user may have put it there, and pibackup does not use a backup others could have "
                f"changed. If it is not pibackup's, remove it (sudo rm -r {p}); if everything in {path} is yours, "
                f"give it back to one owner: sudo chown -R {_fix_owner(top.st_uid)}: {path}",
            )
        )
    if writable:
        more = f" (and {len(writable) - 1} more directories in it)" if len(writable) > 1 else ""
        mode = stat.S_IMODE(os.stat(writable[0]).st_mode) if os.path.exists(writable[0]) else 0
        out.append(
            Problem(
                writable[0],
                False,
                f"{writable[0]}{more} can be written by other users (mode {mode:04o}): they could change or delete "
                f"the backup. Run chmod -R go-w {path}; on a FAT or exFAT stick, which has no permissions, mount it "
                f"for {_fix_owner(top.st_uid)} only (e.g. uid={_fix_owner(top.st_uid)},gid={_fix_owner(top.st_uid)},umask=077)",
            )
        )
    return out


def _name(uid: int) -> str:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return str(uid)


def _owner(path: str) -> str:
    try:
        uid = os.lstat(path).st_uid
    except OSError:
        return "another user"
    return f"{_name(uid)} (uid {uid})"


def _fix_owner(dir_uid: int) -> str:
    """Who should own a backup directory: the plugin's user when it asks; asked by root
    (restore), the directory's owner."""
    return _name(os.geteuid() if os.geteuid() != 0 else dir_uid)


def private(path: str, mode: int) -> None:
    """Take group and other access away from our own file or directory (a marker an earlier
    release made 0644). Not possible on FAT, whose permissions come from the mount: there
    access_problems warns instead."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        st = os.fstat(fd)
        if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) & 0o077:
            os.fchmod(fd, mode)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_marker(path: str) -> None:
    """Is `path` a pibackup backup this release can read, and safe to use (refuse_foreign)?"""
    refuse_foreign(path)
    marker = os.path.join(path, MARKER)
    try:
        with open(marker, encoding="utf-8", errors="replace") as f:
            text = f.read(4096)
    except OSError as e:
        raise DestinationError(f"{path}: cannot read {MARKER}: {e.strerror}") from e
    lines = text.splitlines()
    if not lines or lines[0] != "pibackup backup directory":
        raise DestinationError(f"{marker} is not a pibackup marker: {path} is not a pibackup backup")
    if len(lines) < 2 or lines[1] not in MARKER_FORMATS:
        raise DestinationError(
            f"{path} was written by another release of pibackup, in backup {lines[1] if len(lines) > 1 else 'an unknown format'}; "
            "this pibackup reads formats 1 and 2 only. Use the pibackup release that wrote it."
        )
    if text != MARKER_FORMATS[lines[1]]:
        raise DestinationError(
            f"{marker} is damaged (it holds more than the two lines pibackup wrote): the medium may be failing; "
            "run pibackup verify on it, and if the rest is fine write the file again with exactly those two lines"
        )


def validate(path: Optional[str]) -> None:
    """Refuse a destination a backup must not be written to, with a message that says what to do."""
    example = "e.g. pibackup-destination=/media/usb/pibackup"
    if not path:
        raise DestinationError(f"pibackup-destination is not set: add it to lightningd's config file ({example})")
    if any(ord(c) < 32 for c in path):
        raise DestinationError("pibackup-destination contains control characters; give a plain absolute path")
    if not os.path.isabs(path):
        raise DestinationError(f"pibackup-destination={path} is a relative path; give an absolute path ({example})")
    if not os.path.exists(path):
        raise DestinationError(
            f"pibackup-destination {path} does not exist: is the USB stick mounted? "
            f"Mount it, or create the directory (mkdir -p {path}), then restart lightningd"
        )
    if not os.path.isdir(path):
        raise DestinationError(f"pibackup-destination {path} is not a directory; point it at a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        hint = "remount it read-write or replace the stick" if read_only_fs(path) else "fix its owner or permissions"
        raise DestinationError(f"pibackup-destination {path} is not writable by this user ({_user()}); {hint}")
    # A first start that crashed midway leaves PIBACKUP.tmp, or the lock directory alone.
    entries = set(os.listdir(path)) - {MARKER_TMP, LOCK_DIR}
    if MARKER in entries:
        for name in sorted(entries | {LOCK_DIR}):
            if (name in (MARKER, LOCK_DIR) or GENERATION_RE.match(name)) and os.path.islink(os.path.join(path, name)):
                raise link_error(os.path.join(path, name))
        check_marker(path)
        return
    refuse_foreign(path)
    foreign = sorted(e for e in entries - FS_ARTIFACTS)
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise DestinationError(
            f"pibackup-destination {path} holds files that are not pibackup's ({shown}); "
            f"use an empty directory, e.g. {os.path.join(path, 'pibackup')}"
        )


def link_error(path: str) -> DestinationError:
    return DestinationError(
        f"{path} is a symbolic link (to {os.readlink(path)}); pibackup never follows links inside its backup "
        "directory, which could lead its writes or reads elsewhere. Replace the link with the real directory or file"
    )


def refuse_foreign(path: str) -> List[str]:
    """Raise DestinationError when anything in `path` belongs to another user; return the
    warnings (directories others can write to)."""
    problems = access_problems(path)
    bad = [p for p in problems if p.foreign]
    if bad:
        more = f" ({len(bad) - 1} more entries belong to other users)" if len(bad) > 1 else ""
        raise DestinationError(bad[0].message + more)
    return [p.message for p in problems]


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return str(os.geteuid())
