"""Following a generation's chain while its writer appends to it: from a cut on, up to what
the writer has made durable, across roll-overs (compaction's child and its copy use it).

The chain's rules are chain.py's (check_header); what is the follower's own is that it never
stops short of a durable frame: whatever it cannot read there is damage, not a torn tail.
"""

from __future__ import annotations

import os
from typing import Iterator, Optional, Tuple

from pibackup.errors import DamageError, PibackupError
from pibackup.store.chain import check_header
from pibackup.store.directory import Generation
from pibackup.store.layout import generation_number, segment_filename
from pibackup.store.reader import SegmentReader
from pibackup.store.segment import HEADER_SIZE, Frame, JournalError, SegmentHeader


class FollowError(PibackupError):
    """A segment to follow could not be opened (a compaction fails; the backup goes on)."""


class JournalFollower:
    """Reads a generation's journal from its cut on: segment `first` at `offset`, where the
    writer restarted its deflate stream (`checksum`: the chain value there). Each call of
    frames() goes up to what the writer has made durable, across roll-overs, checking that
    each segment continues the one before and that nothing durable is unreadable. Frames
    before `skip_to` (segment, offset) are read but not returned."""

    def __init__(self, gen_path: str, first: int, offset: int, checksum: int, skip_to: Tuple[int, int] = (0, 0)):
        self.gen_path = gen_path
        self.index = first
        self.skip_to = tuple(skip_to)
        self._resume: Optional[Tuple[int, int]] = (offset, checksum)
        self._reader: Optional[SegmentReader] = None
        self._prev_end: Optional[Tuple[int, int]] = None  # (valid length, last checksum) of the segment before
        self._offset = offset
        number = generation_number(os.path.basename(os.path.normpath(gen_path)))
        # For chain.check_header: no snapshot listed, its checks concern the first segment only.
        self._gen = Generation(number, gen_path, [], []) if number is not None else None
        self._first: Optional[SegmentHeader] = None  # of the first segment followed

    def position(self) -> Tuple[int, int]:
        """(segment, offset) up to which the journal has been read."""
        return self.index, self._reader.valid_length if self._reader is not None else self._offset

    def _open(self) -> SegmentReader:
        path = os.path.join(self.gen_path, segment_filename(self.index))
        try:
            reader = SegmentReader(path)
        except (JournalError, OSError) as e:
            raise FollowError(f"cannot follow {path}: {e}") from e
        h = reader.header
        try:
            if self._gen is not None:
                check_header(self._gen, h, self.index - 1, self._first or h, path)
            if self._prev_end is not None and (h.prev_valid_length, h.prev_checksum) != self._prev_end:
                raise DamageError(f"{path}: does not continue the segment before it", path, 0)
        except BaseException:
            reader.close()
            raise
        self._first = self._first or h
        if self._resume is not None:
            reader.resume_at(*self._resume)
            self._resume = None
        return reader

    def frames(self, segment: int, durable: int, checksum: Optional[int] = None) -> Iterator[Tuple[Frame, str]]:
        """The frames up to (`segment`, `durable` bytes), with "file offset N" for messages;
        `checksum`, when known, is the writer's chain value there. Closed segments are read
        to their end."""
        while True:
            if self._reader is None:
                self._reader = self._open()
            r = self._reader
            closed = self.index < segment
            for f in r.frames(None if closed else durable):
                if (self.index, f.offset) >= self.skip_to:
                    yield f, f"{r.path} offset {f.offset}"
            if not closed:
                if r.valid_length != durable or (checksum is not None and r.final_checksum != checksum):
                    # Never switch to a generation short of an acknowledged frame (nor loop
                    # forever waiting for one that cannot be read).
                    raise DamageError(
                        f"{r.path}: its frames end at offset {r.valid_length} ({r.bad_reason or 'checksum chain differs'}), "
                        f"its writer's at {durable}",
                        r.path,
                        r.valid_length,
                    )
                return
            if r.bad_offset is not None and not r.torn:
                raise DamageError(f"{r.path}: damaged at offset {r.bad_offset} ({r.bad_reason})", r.path, r.bad_offset)
            self._prev_end = (r.valid_length, r.final_checksum)
            r.close()
            self._reader = None
            self.index += 1
            self._offset = HEADER_SIZE

    def close(self) -> None:
        if self._reader is not None:
            self._offset = self._reader.valid_length  # position() stays right
            self._reader.close()
            self._reader = None
