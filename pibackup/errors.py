"""Exceptions with messages a Pi owner can act on.

Every error pibackup raises on purpose derives from PibackupError; anything else is a bug.
"""

from __future__ import annotations

from typing import Optional


class PibackupError(Exception):
    """A failure with a message meant for a person, not a traceback."""


class DamageError(PibackupError):
    """Damaged backup data; `path` and `offset` say where."""

    def __init__(self, message: str, path: str = "", offset: Optional[int] = None):
        super().__init__(message)
        self.path = path
        self.offset = offset
