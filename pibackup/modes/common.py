"""What every backup mode does the same way, written once: open the directory, watch that it
stays in place, replay the early calls, tell a new node, word the refusals, shape the status.

Functions, not a base class: each mode keeps its own order of checks at start-up.
"""

from __future__ import annotations

import errno
import os
from dataclasses import asdict
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

from pibackup.errors import PibackupError
from pibackup.modes.api import Call, Counters
from pibackup.rules.sequence import Action, classify, is_pragma_only, reconcile
from pibackup.store import directory as dst
from pibackup.store.access import DestinationError, validate
from pibackup.store.fsio import io_error_message
from pibackup.store.identity import refuse_other_node
from pibackup.store.snapshot import live_data_version

_Id = Tuple[int, int]  # (st_dev, st_ino)


def open_directory(dest: dst.Destination, other_mode: Callable[[str], bool], refusal: str, live_db: str) -> None:
    """Check the destination, refuse one that holds the other mode's backup (`refusal` says
    so) or another node's, then mark and lock it as ours."""
    validate(dest.path)
    if other_mode(dest.path):
        raise DestinationError(refusal)
    refuse_other_node(dest.path, live_db)
    try:
        dest.prepare()
    except OSError as e:
        raise DestinationError(io_error_message(e, dest.path)) from e


class PlaceGuard:
    """The directory (and the files in it) must still be where we opened them: after a stick
    is unplugged (or lazily unmounted) or the directory deleted, writes and syncs succeed
    into files nobody will see again. One stat per path per durable write.

    st_dev: our open files keep the old file system alive, and no two live ones share a
    device number, so another stick at the path always differs. st_ino is sound even where
    the file system invents inode numbers (FAT, exFAT, FUSE), which change only when the
    kernel forgets the inode: the lock directory (and any file held open) pins them
    (tests/e2e/test_filesystems.py drops the caches under a replay on exFAT)."""

    def __init__(self, destination: str):
        self.destination = destination
        self._paths: Tuple[str, ...] = ()
        self._ids: Optional[List[_Id]] = None

    def remember(self, *paths: str) -> None:
        """Take the identity of `paths` (the destination first) as they are now."""
        self._paths = paths
        self._ids = [_identity(p) for p in paths]

    def check(self) -> None:
        if self._ids is None:
            return
        try:
            now = [_identity(p) for p in self._paths]
        except FileNotFoundError as e:
            raise FileNotFoundError(errno.ENOENT, "the backup directory vanished", self.destination) from e
        if now != self._ids:
            raise OSError(errno.ESTALE, "the backup directory was replaced (stick unplugged?)", self.destination)


def _identity(path: str) -> _Id:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def replay_early(
    early: Sequence[Call],
    position: Callable[[], Tuple[Optional[int], bool]],
    apply: Callable[[Action, int, List[str]], None],
) -> None:
    """Write the calls that came before init after the start-up decided where the backup
    stands. `position()` is (last data_version, last one unconfirmed) as it is now."""
    for c in early:
        last, unconfirmed = position()
        a = classify(last, c.data_version, is_pragma_only(c.writes), unconfirmed)
        if a in (Action.GAP, Action.BEHIND):
            continue  # already in the snapshot just taken: a snapshot is at the live version
        apply(a, c.data_version, c.writes)


def fresh_node(early: Sequence[Call], live: int) -> bool:
    """A brand-new node: the early calls hold its whole history from the schema on, so an
    empty base (no snapshot) followed by them is the whole database."""
    calls = [(c.data_version, is_pragma_only(c.writes)) for c in early]
    return bool(early) and early[0].data_version == 1 and not calls[0][1] and reconcile(0, False, calls, live) is Action.APPEND


def behind_message(live_db: str, live: int, held: str, destination: str, left: str, advice: str = "") -> str:
    """The refusal of a live database older than the backup; `held` says what holds the
    newer state ("the replica in ... (data_version N)"), `left` what was left untouched."""
    return (
        f"lightningd's database {live_db} (data_version {live}) is OLDER than {held}. Running on it could lose funds. "
        f"Stop lightningd and restore the newer state: pibackup restore {destination} {live_db} --force "
        f"(after moving the old file away). {advice}{left} was left untouched"
    )


def gate(failure: Optional[str]) -> None:
    """Once a failure is set nothing more reaches the medium: every write raises it."""
    if failure is not None:
        raise DestinationError(failure)


def free_bytes(path: str) -> Optional[int]:
    """Free space for an unprivileged writer, None when the medium cannot say (taken outside
    the writer's lock: a hung medium must not hold it)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def base_status(
    destination: str,
    live_db: str,
    free: Optional[int],
    generations: int,
    generation: Optional[str],
    last: Optional[int],
    last_flush: Optional[float],
    filter_tables: FrozenSet[str],
    counters: Counters,
) -> Dict[str, Any]:
    """The status keys every mode has (the fan-out reads "destinations", "generation",
    "data_version" and "counters" of each member)."""
    return {
        "destinations": [
            {
                "path": destination,
                "free_bytes": free,
                "generations": generations,
                "last_write": None if last_flush is None else int(last_flush),
            }
        ],
        "destination": destination,
        "live_db": live_db,
        "generation": os.path.basename(generation or ""),
        "data_version": last,
        "filter_tables": sorted(filter_tables),
        "counters": asdict(counters),
    }


def committed_at_end(live_db: str, last: Optional[int]) -> bool:
    """At the end: does the live database hold `last`, the newest transaction, which only
    lightningd's next call would otherwise prove committed? A busy or missing database: no."""
    if last is None:
        return False
    try:
        live: Optional[int] = live_data_version(live_db, timeout=1.0)
    except PibackupError:
        live = None
    return live == last
