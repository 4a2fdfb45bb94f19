"""Who may change a backup directory: the owner of everything in it, and who can write to it.

Another local user's file in a backup directory (planted where they could write) must never
be restored from; a directory others can write to is worth a warning. A FAT or exFAT stick
has no permissions: it shows every file 0777 with one owner, the mount's, and must go on
working (with the warning).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import List

from pibackup.store.layout import FS_ARTIFACTS


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
