"""Core Lightning's data_version rules: what a db_write call means for the backup.

Pure decisions, no I/O: append, rewind, PRAGMA-only, gap, behind.
"""

from __future__ import annotations

import enum
import re
from typing import Optional, Sequence, Tuple

# data_version is an unsigned 32-bit counter in the hook and wraps.
MODULUS = 1 << 32
_HALF = 1 << 31

_PRAGMA = re.compile(r"\s*PRAGMA\b", re.IGNORECASE)


class Action(enum.Enum):
    APPEND = "append"  # N == last + 1
    REWIND = "rewind"  # N == last: the last transaction was never committed; replace it
    PRAGMA = "pragma"  # PRAGMA-only call that repeats the last version: not a rewind
    GAP = "gap"  # N > last + 1: lightningd committed transactions without us
    BEHIND = "behind"  # N < last: the live database is older than the backup


def is_pragma_only(writes: Sequence[str]) -> bool:
    """True for the calls lightningd makes around migrations: PRAGMAs and no version bump."""
    return bool(writes) and all(_PRAGMA.match(w) for w in writes)


def distance(frm: int, to: int) -> int:
    """Steps from frm forward to to, modulo 2**32."""
    return (to - frm) % MODULUS


def classify(last: Optional[int], version: int, pragma: bool, last_is_journaled: bool = True) -> Action:
    """Decide what a call with this data_version means after a backup ending at `last`.

    `last` is the data_version of the newest transaction the backup holds (the
    snapshot's version when it holds none), or None when there is no backup yet.
    `pragma` says the call is PRAGMA-only (is_pragma_only). `last_is_journaled` is
    False when `last` comes from a snapshot or is followed by a PRAGMA call: then it is
    known to be committed and can never be rewound.
    """
    if last is None:
        return Action.GAP
    d = distance(last, version)
    if d == 0:
        if pragma:
            return Action.PRAGMA
        return Action.REWIND if last_is_journaled else Action.BEHIND
    if d == 1:
        # A PRAGMA-only call carries the live DB's current version: if that is one
        # ahead of us, lightningd committed a transaction we never saw.
        return Action.GAP if pragma else Action.APPEND
    if d < _HALF:
        return Action.GAP
    return Action.BEHIND


def next_version(version: int) -> int:
    return (version + 1) % MODULUS


def reconcile(last: Optional[int], last_unconfirmed: bool, calls: Sequence[Tuple[int, bool]], live_version: int) -> Action:
    """At init: can the backup go on with the calls that came before init?

    `last_unconfirmed`: the backup's newest transaction was answered by an earlier plugin
    process and nothing shows lightningd committed it. Then only a resend of it (a rewind)
    may follow: lightningd may have committed another transaction with that data_version
    whose answer never reached the backup (sent before an init that never came).
    `calls` are (data_version, pragma-only) of this start's calls before init, all committed
    by now; `live_version` is what the live DB holds now. Returns APPEND (go on: journal
    those calls), GAP (start a new generation from a snapshot) or BEHIND.
    """
    if last is None:
        return Action.GAP
    journaled = last_unconfirmed
    for i, (version, pragma) in enumerate(calls):
        a = classify(last, version, pragma, journaled)
        if a in (Action.GAP, Action.BEHIND):
            return a
        if i == 0 and last_unconfirmed and a is not Action.REWIND:
            return Action.GAP
        if a is Action.PRAGMA:
            journaled = False
        else:
            last, journaled = version, True
    ahead = distance(live_version, last)
    if ahead == 1 and journaled:
        # The newest transaction was answered but never committed: lightningd sends that
        # data_version again (a rewind).
        return Action.APPEND
    if ahead == 0 and (calls or not last_unconfirmed):
        return Action.APPEND
    if distance(last, live_version) < _HALF:
        return Action.GAP
    return Action.BEHIND
