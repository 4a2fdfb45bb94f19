"""The journal writer's start: where the newest generation stands, and whether it is continued
or a new one begun from the live database (a gap, damage, a changed filter, a new node).

A part of the writer (JournalWriter inherits it), split off for its size: it runs under the
writer's lock, before the hook's first call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, FrozenSet, Optional, Sequence

from pibackup.errors import DamageError, PibackupError
from pibackup.modes.api import BehindError, Call, Log
from pibackup.modes.common import behind_message, fresh_node, replay_early
from pibackup.rules.sequence import Action, is_pragma_only, reconcile
from pibackup.store import directory as dst
from pibackup.store.chain import Tail, read_tail
from pibackup.store.generation import generation_info, generation_settings
from pibackup.store.segment import HEADER_SIZE, KIND_TX, SegmentHeader, decode_header
from pibackup.store.snapfile import database_bytes
from pibackup.store.snapshot import live_data_version


@dataclass
class _Tail:
    """Where the newest generation stands, as far as the writer is concerned."""

    generation: dst.Generation
    last: Optional[int]  # data_version of its newest transaction (base version without one)
    last_unconfirmed: bool  # that transaction was answered, but nothing shows lightningd committed it
    tail: Optional[Tail]  # None when the generation could not be read
    damage: Optional[str]  # set when it must not be continued



class Startup:
    """The start-up half of the journal writer (its attributes are the writer's)."""

    destination: str
    live_db: str
    log: Log
    dest: dst.Destination
    filter_tables: FrozenSet[str]
    generation: Optional[str]
    last: Optional[int]
    last_is_journaled: bool
    journal_bytes: int
    snapshot_bytes: int
    base_version: Optional[int]
    # Set by the fan-out before a rejoin's start: lightningd committed every transaction up to
    # this data_version (it is sending the next), so the backup's last one needs no commit mark.
    committed_through: Optional[int] = None

    def _new_generation(self, snapshot: bool) -> None:
        raise NotImplementedError

    def _apply(self, a: Action, data_version: int, writes: Any) -> None:
        raise NotImplementedError

    def _open_segment(self, like: SegmentHeader, number: int, prev_length: int, prev_checksum: int, trim_now: bool = True) -> None:
        raise NotImplementedError

    def _start(self, early: Sequence[Call]) -> None:
        live = live_data_version(self.live_db)
        tail = self._read_tail()
        done = self.committed_through
        if tail is not None and tail.last_unconfirmed and done is not None and tail.last is not None and tail.last <= done:
            tail.last_unconfirmed = False
        calls = [(c.data_version, is_pragma_only(c.writes)) for c in early]
        if tail is None:
            if fresh_node(early, live):
                self._new_generation(snapshot=False)
                self._replay_early(early)
                return
            self._new_generation(snapshot=True)
            self._replay_early(early)
            return
        action = reconcile(tail.last, tail.last_unconfirmed, calls, live)
        if action is Action.BEHIND:
            assert tail.last is not None
            raise BehindError(self._behind_message(tail.last, live, tail.generation.name))
        if tail.damage is not None:
            self.log(
                f"newest backup generation {tail.generation.name} is damaged ({tail.damage}); it is kept as it is "
                "and a new generation is started from a snapshot of the live database",
                "warn",
            )
            action = Action.GAP
        elif action is not Action.GAP and self._filter_changed(tail.generation):
            action = Action.GAP
        elif action is Action.GAP:
            self.log(
                f"the backup ends at data_version {tail.last} and cannot be continued (live database at {live}: "
                "lightningd committed transactions without pibackup, or the plugin died before it could confirm "
                "them): starting a new generation from a snapshot",
                "warn",
            )
        if action is Action.GAP:
            self._new_generation(snapshot=True)
        else:
            self._continue(tail)
        self._replay_early(early)

    def _filter_changed(self, gen: dst.Generation) -> bool:
        """A generation holds one filter's frames: with another pibackup-filter-tables it is
        not continued (a restore would mix filtered and unfiltered rows of those tables)."""
        was = generation_settings(gen).get("filter-tables")
        now = ",".join(sorted(self.filter_tables))
        if was is None or was == now:
            return False
        self.log(
            f"pibackup-filter-tables changed ({gen.name} filters {was or 'nothing'}, now {now or 'nothing'}): "
            "starting a new generation from a snapshot, so that one generation never mixes the two",
            "warn",
        )
        return True

    def _behind_message(self, backup_version: int, live: int, gen: str) -> str:
        held = f"the backup in {self.destination} ({gen}, data_version {backup_version})"
        advice = "If this is a different node, give it an empty pibackup-destination. "
        return behind_message(self.live_db, live, held, self.destination, "The backup", advice=advice)

    def _replay_early(self, early: Sequence[Call]) -> None:
        replay_early(early, lambda: (self.last, self.last_is_journaled), self._apply)

    def _read_tail(self) -> Optional[_Tail]:
        gen = self.dest.newest()
        if gen is None:
            return None
        try:
            t = read_tail(gen)
        except DamageError as e:
            # Still compare the live DB with what the generation claims to hold, so an old
            # live DB is never snapshotted over a newer (if damaged) backup.
            try:
                base = generation_info(gen).base_version
            except DamageError:
                base = None
            return _Tail(gen, base, False, None, str(e))
        damage = None
        if t.bad_offset is not None and not t.torn:
            damage = f"{t.path} is damaged at offset {t.bad_offset} ({t.bad_reason})"
        mark = dst.damage_mark(gen.path)
        if damage is None and mark is not None:
            damage = f"a compaction found it damaged: {mark}"
        if t.last_frame is None:
            return _Tail(gen, t.header.base_version, False, t, damage)
        # The last frame decides: a PRAGMA frame (a commit mark when empty) repeats the
        # current version and proves the transaction before it was committed.
        f = t.last_frame
        return _Tail(gen, f.data_version, f.kind == KIND_TX, t, damage)

    def _continue(self, tail: _Tail) -> None:
        """Go on in the newest generation, in a new segment: a segment's deflate stream
        cannot be resumed by another process, and written bytes are never touched."""
        t = tail.tail
        assert t is not None
        self.generation = tail.generation.path
        self.last, self.last_is_journaled = tail.last, tail.last_unconfirmed
        self.journal_bytes = journal_bytes_of(tail.generation.segments, t.valid_length)
        self.base_version = t.header.base_version
        self.snapshot_bytes = database_bytes(tail.generation.snapshot) if tail.generation.snapshot else 0
        if t.bad_offset is not None:
            # A torn tail from a crash mid-append: it was never acknowledged. The new
            # segment's header records where the valid part ended.
            self.log(
                f"{t.path}: unfinished append after offset {t.valid_length} (a write cut short by a crash); "
                "continuing in a new segment",
                "info",
            )
        self._open_segment(t.header, t.header.segment + 1, t.valid_length, t.final_checksum)


def file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def journal_bytes_of(segments: Sequence[str], last_valid: int) -> int:
    """Valid bytes of a generation's journal (preallocated zeros left out): each segment's
    header records the valid length of the one before it."""
    total = last_valid
    for path in segments[1:]:
        try:
            with open(path, "rb") as f:
                total += decode_header(f.read(HEADER_SIZE), path).prev_valid_length
        except (OSError, PibackupError):
            total += file_size(path)
    return total
