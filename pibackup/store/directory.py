"""A backup directory on the backup medium: its generations, the writer's lock, damage marks.

Layout (FORMAT.md): DEST/PIBACKUP, DEST/gen-NNNNNN/{snapshot-vN.sqlite3, seg-NNNNNN.pbj},
DEST/PIBACKUP.lock/ (an empty directory only its owner can open: the writer's lock).
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
import time
from dataclasses import dataclass
from typing import List, Optional

from pibackup.store.access import MARKER_TEXT, DestinationError, link_error, private, refuse_foreign
from pibackup.store.fsio import fsync_dir, write_text_durably
from pibackup.store.layout import (
    DAMAGE_MARK,
    DELETED_GENERATION_RE,
    DELETED_SUFFIX,
    GENERATION_RE,
    LOCK_DIR,
    MARKER,
    PARTIAL_GENERATION_RE,
    PARTIAL_SUFFIX,
    SEGMENT_RE,
    SNAPSHOT_RE,
    TMP_SUFFIX,
    generation_dirname,
)
from pibackup.testpoints import fault_point


@dataclass(frozen=True)
class Generation:
    number: int
    path: str
    snapshots: List[str]  # exactly one, or none for a generation that starts from an empty database
    segments: List[str]

    @property
    def snapshot(self) -> Optional[str]:
        return self.snapshots[0] if self.snapshots else None

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def damage_mark(gen_path: str) -> Optional[str]:
    """What the writer that found generation `gen_path` damaged wrote, or None."""
    try:
        with open(os.path.join(gen_path, DAMAGE_MARK), encoding="utf-8", errors="replace") as f:
            return f.read(4096).strip() or "damaged"
    except FileNotFoundError:
        return None


def write_damage_mark(gen_path: str, why: str) -> None:
    """Mark a generation damaged, durably: no later start continues it."""
    write_text_durably(os.path.join(gen_path, DAMAGE_MARK), why + "\n")


def _remove_tree(path: str) -> None:
    """rmtree, retried: the compaction process of a plugin that was just killed may still be
    finishing a write into this directory when the next plugin starts."""
    for attempt in range(20):
        try:
            shutil.rmtree(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            if attempt == 19:
                raise
            time.sleep(0.1)


def writer_running(path: str) -> bool:
    """Does a plugin hold the writer's lock on this backup directory right now?

    Asked by root or the backup's owner (restore, status). A backup whose writer never ran
    this release has no lock directory: its writer (an earlier release) locks the marker.
    A user who cannot open the lock directory cannot tell: the answer is then yes, so that
    a restore never replaces a database a running node may be using."""
    lock_dir = os.path.join(path, LOCK_DIR)
    if not os.path.lexists(lock_dir):
        return _locked(os.path.join(path, MARKER))
    return _locked(lock_dir)


def _locked(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)  # a directory too
    except PermissionError:
        return True
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


class Destination:
    """A local backup directory. The writer holds an flock on DEST/PIBACKUP.lock while it runs."""

    def __init__(self, path: str):
        self.path = path
        self._lock_fd = -1

    # --- reading -------------------------------------------------------------
    def generations(self) -> List[Generation]:
        """Complete generations, oldest first. `.partial` directories are never listed, nor
        one another user owns (access_problems: refused before, ignored if planted since)."""
        out = []
        trusted = {os.stat(self.path).st_uid, 0}
        for name in sorted(os.listdir(self.path)):
            m = GENERATION_RE.match(name)
            if not m:
                continue
            gpath = os.path.join(self.path, name)
            st = os.lstat(gpath)
            if stat.S_ISLNK(st.st_mode):
                raise link_error(gpath)
            if st.st_uid not in trusted:
                continue
            files = sorted(os.listdir(gpath))
            for f in files:
                if SNAPSHOT_RE.match(f) or SEGMENT_RE.match(f):
                    fst = os.lstat(os.path.join(gpath, f))
                    if stat.S_ISLNK(fst.st_mode):
                        raise link_error(os.path.join(gpath, f))
                    if fst.st_uid not in trusted:
                        # Never read past it, nor drop it: a generation without its newest
                        # segment would restore an older state without a word.
                        refuse_foreign(self.path)
            snaps = [f for f in files if SNAPSHOT_RE.match(f)]
            segs = [os.path.join(gpath, f) for f in files if SEGMENT_RE.match(f)]
            out.append(Generation(int(m.group(1)), gpath, [os.path.join(gpath, f) for f in snaps], segs))
        return out

    def newest(self) -> Optional[Generation]:
        gens = self.generations()
        return gens[-1] if gens else None

    # --- writing -------------------------------------------------------------
    def prepare(self) -> None:
        """Write the marker on first use and take the writer's lock.

        A backup an earlier release wrote (marker 0644, no lock directory) is taken over as
        it is: the marker is made 0600 and the lock directory created."""
        marker = os.path.join(self.path, MARKER)
        if not os.path.exists(marker):
            write_text_durably(marker, MARKER_TEXT)  # its .tmp replaced if a first start crashed after creating it
        private(marker, 0o600)
        lock_dir = os.path.join(self.path, LOCK_DIR)
        try:
            os.mkdir(lock_dir, 0o700)
        except FileExistsError:
            if os.path.islink(lock_dir) or not os.path.isdir(lock_dir):
                raise DestinationError(
                    f"{lock_dir} is pibackup's lock directory, but it is not a directory; remove it and restart lightningd"
                ) from None
        private(lock_dir, 0o700)
        refuse_foreign(self.path)  # also what this start just created: files of a user the directory is not owned by
        fd = os.open(lock_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise DestinationError(
                    f"{self.path} is being written by another pibackup (another lightningd?); "
                    "give each node its own pibackup-destination"
                ) from e
            raise
        self._lock_fd = fd
        with open(marker, encoding="utf-8", errors="replace") as f:
            if f.read(4096) != MARKER_TEXT:  # a format 1 backup: from now on it may hold compressed snapshots
                write_text_durably(marker, MARKER_TEXT)
        self.remove_partials()

    def remove_partials(self) -> None:
        """A `.partial` generation, or a `.tmp` segment, never acknowledged anything: drop them.
        A `.deleted` generation is one retention had begun to delete: finish that."""
        for name in os.listdir(self.path):
            if PARTIAL_GENERATION_RE.match(name) or DELETED_GENERATION_RE.match(name):
                _remove_tree(os.path.join(self.path, name))
        fsync_dir(self.path)
        newest = self.newest()
        if newest is not None:
            for name in os.listdir(newest.path):
                if name.endswith(TMP_SUFFIX):
                    os.unlink(os.path.join(newest.path, name))

    def next_generation_number(self) -> int:
        gens = self.generations()
        return gens[-1].number + 1 if gens else 1

    def begin_generation(self, number: int) -> str:
        path = os.path.join(self.path, generation_dirname(number) + PARTIAL_SUFFIX)
        os.mkdir(path, 0o700)
        return path

    def commit_generation(self, partial: str, dir_synced: bool = False) -> str:
        """Make a fully written and synced `.partial` generation visible, atomically.
        `dir_synced`: the caller synced the directory after its last change."""
        if not dir_synced:
            fsync_dir(partial)
        final = partial[: -len(PARTIAL_SUFFIX)]
        fault_point("generation-rename", partial)
        os.rename(partial, final)
        fault_point("generation-renamed", self.path)
        fsync_dir(self.path)
        return final

    def delete_generation(self, gen: Generation) -> None:
        """Retention: rename to `.deleted` first (atomic: readers stop seeing it at once, and
        a crash halfway through the removal never leaves a half-deleted `gen-NNNNNN`), then
        remove it."""
        doomed = gen.path + DELETED_SUFFIX
        os.rename(gen.path, doomed)
        fsync_dir(self.path)
        shutil.rmtree(doomed)
        fsync_dir(self.path)

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
