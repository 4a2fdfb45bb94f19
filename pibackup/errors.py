"""Exceptions with messages a Pi owner can act on.

Every error pibackup raises on purpose derives from PibackupError; anything else is a bug.
"""


class PibackupError(Exception):
    """A failure with a message meant for a person, not a traceback."""
