"""File-system helpers for writing to the backup medium durably and privately.

Every rename that makes a file visible is preceded by a sync of the file and followed by one of its directory.
"""

from __future__ import annotations

import errno
import os

from pibackup.store.layout import TMP_SUFFIX
from pibackup.testpoints import fault_point

# Zero scans and preallocation read and write in pieces this big: small buffers, so two
# writers at once (the hook and a compaction) stay light.
IO_CHUNK = 64 * 1024


def io_error_message(e: OSError, where: str) -> str:
    """Say what a failed write to the backup medium means and what to do about it."""
    reason = {
        errno.ENOSPC: "the backup medium is full; free space on it or replace it with a bigger one",
        errno.EDQUOT: "the disk quota on the backup medium is exhausted; raise it or free space",
        errno.EROFS: "the backup medium is read-only (the kernel may have remounted it after errors); "
        "check it, remount it read-write or replace it",
        errno.EIO: "I/O error on the backup medium: the stick or card may be failing or was unplugged; replace it",
        errno.ENOENT: "the backup directory vanished: was the USB stick unplugged? Plug it in and mount it again",
        errno.ENODEV: "the backup device is gone: was the USB stick unplugged? Plug it in and mount it again",
        errno.EACCES: "permission denied; fix the owner or permissions of the backup directory",
        errno.ESTALE: "another file system is mounted at the backup directory now (was the USB stick pulled and a "
        "stick mounted in its place?); nothing written since was acknowledged: check the stick and restart lightningd",
        errno.ENOTCONN: "the stick's FUSE file system process is gone (exFAT or NTFS mounted through FUSE); "
        "unmount it (umount -l), mount it again and restart lightningd",
    }.get(e.errno or 0, e.strerror or str(e))
    return f"cannot write the backup at {where}: {reason}"


def fsync_file(path: str) -> None:
    """Sync a file written by someone else (SQLite) through a descriptor of our own."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    fault_point("dirsync", path)
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_durably(path: str, text: str) -> None:
    """PATH.tmp written and synced, renamed to PATH, the directory synced: PATH is either
    absent or whole, after any crash (a leftover PATH.tmp is simply written again)."""
    tmp = path + TMP_SUFFIX
    try:
        os.unlink(tmp)  # a leftover: created anew below, so it is never someone else's file or link
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with open(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    fsync_dir(os.path.dirname(path))


def private_file(path: str) -> int:
    """Create (or empty) `path` readable and writable by its owner only, whatever the umask:
    a database or snapshot holds the node's channel state. Returns its descriptor, open
    for writing. SQLite creates a database's journal files with the database's mode."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    except BaseException:
        os.close(fd)
        raise
    return fd
