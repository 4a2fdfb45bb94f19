"""File-system helpers for writing to the backup medium."""

from __future__ import annotations

import errno


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
