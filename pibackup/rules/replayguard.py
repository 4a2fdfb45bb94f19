"""Replay guard: the only SQL a journal or replica can make a replaying connection run.

A static check of each statement's text (verify needs no database for it) and a connection
whose SQLite authorizer allows, while it runs a journalled statement, only what lightningd writes.
"""

from __future__ import annotations

import re
import sqlite3
from typing import Any, FrozenSet, Iterable, Optional, Sequence

from pibackup.errors import PibackupError

_OK = sqlite3.SQLITE_OK
_DENY = sqlite3.SQLITE_DENY


class Refused(PibackupError):
    """A journalled statement pibackup will not replay: lightningd never writes it, so the
    backup was altered after it was written (or by a bug). `kind` names the statement or
    the action in it; `statement` is its text."""

    def __init__(self, kind: str, statement: str, why: str = ""):
        self.kind = kind
        self.statement = statement
        head = statement.strip()
        quote = head[:80] + ("..." if len(head) > 80 else "")
        super().__init__(f"refused {kind} statement{': ' + why if why else ''}: {quote!r} (lightningd never writes this)")


# --- the static check ------------------------------------------------------------------------
_NAME = r'(?:"(?:[^"]|"")*"|`(?:[^`]|``)*`|\[[^\]]*\]|[A-Za-z_][\w$]*)'
# The statements lightningd writes, and the object each one names first (schema-qualified or
# not). Only the start is matched: the authorizer checks the rest when it is replayed.
_HEAD = re.compile(
    r"""\s*(?P<kind>
        INSERT(?:\s+OR\s+[A-Za-z]+)?\s+INTO
      | UPDATE(?:\s+OR\s+[A-Za-z]+)?
      | DELETE\s+FROM
      | CREATE\s+(?:UNIQUE\s+)?INDEX(?:\s+IF\s+NOT\s+EXISTS)?
      | CREATE\s+TABLE(?:\s+IF\s+NOT\s+EXISTS)?
      | (?P<trigger>CREATE\s+TRIGGER)(?:\s+IF\s+NOT\s+EXISTS)?
      | ALTER\s+TABLE
      | DROP\s+(?:TABLE|INDEX|TRIGGER)(?:\s+IF\s+EXISTS)?
    )\s+(?P<first>"""
    + _NAME
    + r""")(?:\s*\.\s*(?P<second>"""
    + _NAME
    + r"))?",
    re.IGNORECASE | re.VERBOSE,
)
_PRAGMA = re.compile(r"\s*PRAGMA\s+foreign_keys\s*=\s*(?:ON|OFF)\s*;?\s*\Z", re.IGNORECASE)
_WORDS = re.compile(r"\s*([A-Za-z]+)(?:\s+([A-Za-z_]+))?")
_SECOND = frozenset("TABLE INDEX TRIGGER VIEW TEMP TEMPORARY VIRTUAL UNIQUE DATABASE INTO FROM OR TRANSACTION".split())
# Tokens for finding where a statement ends: quoted text and comments (whose ';' are not
# ends), ';', words (END closes a trigger's body), anything else.
_TOKEN = re.compile(
    r"""'[^']*(?:''[^']*)*'
      | "[^"]*(?:""[^"]*)*"
      | `[^`]*(?:``[^`]*)*`
      | \[[^\]]*\]
      | --[^\n]*
      | /\*.*?\*/
      | (?P<semi>;)
      | (?P<word>[A-Za-z_][\w$]*)
      | (?P<open>['"`\[]|/\*)
      | [^'"`\[;A-Za-z_/-]+
      | .""",
    re.VERBOSE | re.DOTALL,
)
_BLANK = re.compile(r"(?:\s+|--[^\n]*|/\*.*?\*/)*\Z", re.DOTALL)


def _kind(statement: str) -> str:
    """The statement's first keyword(s), for messages: ATTACH DATABASE, PRAGMA journal_mode."""
    m = _WORDS.match(statement)
    if m is None:
        return "an empty" if not statement.strip() else "an unreadable"
    first, second = m.group(1).upper(), m.group(2) or ""
    if first == "PRAGMA" and second:
        return f"PRAGMA {second}"
    return f"{first} {second.upper()}" if second.upper() in _SECOND else first


def _end(statement: str, trigger: bool) -> Optional[int]:
    """Where the first statement in `statement` ends (just after its ';'), or None if it has
    no ';' outside quotes and comments. Raises Refused for an unterminated quote or comment.
    A trigger's body holds ';'s of its own: its statement ends at the ';' after `; END`."""
    seen_semi = at_end = False
    for m in _TOKEN.finditer(statement):
        if m.group("open") is not None:
            raise Refused(_kind(statement), statement, "an unterminated quote or comment")
        if m.group("semi") is not None:
            if not trigger or at_end:
                return m.end()
            seen_semi, at_end = True, False
        elif m.group("word") is not None:
            at_end = seen_semi and m.group("word").upper() == "END"
            seen_semi = False
        elif not m.group(0).isspace() and not m.group(0).startswith(("--", "/*")):
            seen_semi = at_end = False
    return None


def check_statement(statement: str, pragma_frame: bool = False) -> None:
    """Raise Refused unless `statement` is exactly one statement of a kind lightningd writes:
    in a PRAGMA frame (statements run outside a transaction) only `PRAGMA foreign_keys =
    ON|OFF`; in a transaction INSERT, UPDATE, DELETE, CREATE [UNIQUE] INDEX / TABLE /
    TRIGGER, ALTER TABLE, DROP TABLE / INDEX / TRIGGER, on the main database."""
    if pragma_frame:
        if not _PRAGMA.match(statement):
            raise Refused(_kind(statement), statement, "only PRAGMA foreign_keys = ON or OFF is run outside a transaction")
        return
    m = _HEAD.match(statement)
    if m is None:
        raise Refused(_kind(statement), statement)
    if m.group("second") is not None:  # schema.name: only main (never temp or another file)
        schema = m.group("first")[1:-1] if m.group("first")[0] in "\"`[" else m.group("first")
        if schema.lower() != "main":
            raise Refused(_kind(statement), statement, f"it names the database {schema!r}; lightningd writes only its main one")
    # Fast path: without a ';' before its last character there can be no second statement.
    body = statement.rstrip()
    if ";" not in body[:-1]:
        return
    end = _end(statement, m.group("trigger") is not None)
    if end is not None and not _BLANK.match(statement, end):
        rest = statement[end:].lstrip()
        raise Refused(_kind(statement), statement, f"a second statement follows it: {rest[:60]!r}")


def check_frame(statements: Sequence[str], pragma_frame: bool) -> None:
    for s in statements:
        check_statement(s, pragma_frame)


class Unreplayable(PibackupError):
    """lightningd sent a call that pibackup could store but never replay."""


def check_call(data_version: int, writes: Sequence[str], pragma_only: bool) -> None:
    """Refuse, on the hook's path, a call no restore would replay: stored, it would be
    acknowledged and then lost at the restore that needs it; refused, lightningd does not commit it."""
    try:
        check_frame(writes, pragma_only)
    except Refused as e:
        raise Unreplayable(
            f"lightningd's call at data_version {data_version} holds a statement pibackup does not replay: {e}. "
            "Is this lightningd newer than pibackup? Update pibackup"
        ) from e


# --- the guarded connection -------------------------------------------------------------------
# While a journalled statement is prepared, these act on the main database only. (ALTER
# TABLE's a1 is the database; for the rest the 4th argument is.)
_MAIN: FrozenSet[int] = frozenset(
    {
        sqlite3.SQLITE_INSERT,
        sqlite3.SQLITE_UPDATE,
        sqlite3.SQLITE_DELETE,
        sqlite3.SQLITE_READ,
        sqlite3.SQLITE_CREATE_INDEX,
        sqlite3.SQLITE_CREATE_TABLE,
        sqlite3.SQLITE_CREATE_TRIGGER,
        sqlite3.SQLITE_DROP_TABLE,
        sqlite3.SQLITE_DROP_INDEX,
        sqlite3.SQLITE_DROP_TRIGGER,
        sqlite3.SQLITE_REINDEX,
    }
)
_TEMP_SCHEMA = ("sqlite_temp_master", "sqlite_temp_schema")  # ALTER TABLE reads and updates it
# Built-in functions without effects outside the database, and ALTER TABLE's internal ones.
_FUNCTIONS: FrozenSet[str] = frozenset(
    """abs char coalesce format glob hex ifnull iif instr length like likelihood likely lower ltrim max min
    nullif printf quote random randomblob replace round rtrim sign substr substring trim typeof unhex unicode
    unlikely upper zeroblob date time datetime julianday unixepoch strftime avg count group_concat string_agg
    sum total sqlite_rename_column sqlite_rename_table sqlite_rename_test sqlite_rename_quotefix
    sqlite_drop_column""".split()
)
_NEVER_FUNCTIONS = frozenset({"load_extension", "fts3_tokenizer", "readfile", "writefile", "edit"})
_NAMES = {
    sqlite3.SQLITE_ATTACH: "ATTACH",
    sqlite3.SQLITE_DETACH: "DETACH",
    sqlite3.SQLITE_TRANSACTION: "transaction control (BEGIN, COMMIT, ROLLBACK)",
    sqlite3.SQLITE_SAVEPOINT: "SAVEPOINT",
    sqlite3.SQLITE_PRAGMA: "PRAGMA",
    sqlite3.SQLITE_CREATE_TEMP_TABLE: "a TEMP table",
    sqlite3.SQLITE_CREATE_TEMP_INDEX: "a TEMP index",
    sqlite3.SQLITE_CREATE_TEMP_TRIGGER: "a TEMP trigger",
    sqlite3.SQLITE_CREATE_TEMP_VIEW: "a TEMP view",
    sqlite3.SQLITE_CREATE_VIEW: "a view",
    sqlite3.SQLITE_DROP_VIEW: "DROP VIEW",
    sqlite3.SQLITE_CREATE_VTABLE: "a virtual table",
    sqlite3.SQLITE_DROP_VTABLE: "DROP of a virtual table",
    sqlite3.SQLITE_ANALYZE: "ANALYZE",
    sqlite3.SQLITE_RECURSIVE: "a recursive query",
    sqlite3.SQLITE_FUNCTION: "a function",
}


class _Policy:
    """The authorizer. Kept apart from the connection (no reference cycle through it).
    It runs several times for every statement lightningd wrote (once per column read or
    set), on the hook's path in replica mode: the common case is the first test."""

    _NONE: FrozenSet[str] = frozenset()

    def __init__(self, protected: FrozenSet[str]):
        self.protected = protected
        self.strict = False
        self.out_of_reach = self._NONE  # `protected` while strict
        self.refusal: Optional[str] = None

    def set_strict(self, strict: bool) -> None:
        self.strict = strict
        self.out_of_reach = self.protected if strict else self._NONE

    def authorize(self, action: int, a1: Optional[str], a2: Optional[str], db: Optional[str], _src: Optional[str]) -> int:
        if db == "main" and action in _MAIN and a1 not in self.out_of_reach and a2 not in self.out_of_reach:
            return _OK  # allowed in both modes
        if not self.strict:
            # The replayer's own statements: anything but another database file or an extension.
            if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH) or (
                action == sqlite3.SQLITE_FUNCTION and a2 in _NEVER_FUNCTIONS
            ):
                return self._refuse(action, a1, a2, db)
            return _OK
        if action == sqlite3.SQLITE_FUNCTION:
            if a2 in _FUNCTIONS:
                return _OK
        elif action == sqlite3.SQLITE_SELECT:  # a subquery; what it reads is checked apart
            return _OK
        elif action in (sqlite3.SQLITE_READ, sqlite3.SQLITE_UPDATE):
            if db == "temp" and a1 in _TEMP_SCHEMA:
                return _OK
        elif action == sqlite3.SQLITE_ALTER_TABLE:
            if a1 == "main" and a2 not in self.protected:
                return _OK
        elif action == sqlite3.SQLITE_PRAGMA:
            if (a1 or "").lower() == "foreign_keys" and (a2 or "").lower() in ("on", "off"):
                return _OK
        return self._refuse(action, a1, a2, db)

    def _refuse(self, action: int, a1: Optional[str], a2: Optional[str], db: Optional[str]) -> int:
        what = _NAMES.get(action, f"SQLite action {action}")
        if action == sqlite3.SQLITE_FUNCTION:
            what = f"the function {a2}()"
        elif action == sqlite3.SQLITE_PRAGMA:
            what = f"PRAGMA {a1}" + (f" = {a2}" if a2 else "")
        elif action == sqlite3.SQLITE_ATTACH:
            what = f"ATTACH of {a1!r}"
        elif action not in _NAMES:
            target = a1 if a1 not in (None, db) else a2
            what = f"a write to {target!r} in the database {db!r}" if db not in (None, "main") else f"access to {target!r}"
        if self.refusal is None:
            self.refusal = what
        return _DENY


class GuardedConnection(sqlite3.Connection):
    """A connection for replaying journalled or replica statements: `replay()` runs one
    under the strict authorizer; `execute()` is for the replayer's own statements (BEGIN,
    COMMIT, its PRAGMAs, its state table), which may do anything but open another file.

    Why a statement compiled for one mode can never run in the other: SQLite calls the
    authorizer only while it compiles (prepares) a statement, and Python keeps compiled
    statements in a per-connection cache keyed by their text. This connection has no such
    cache (cached_statements=0), so every execute() and replay() compiles its text afresh,
    under the mode of that call. replay() finishes and closes its statement before it leaves
    strict mode, so no compiled statement outlives the mode it was checked in; SQLite's own
    recompilation of a statement (after a schema change) happens only while that statement
    is stepped, inside the same call. ATTACH (through which VACUUM and VACUUM INTO go) is
    also limited to zero databases, whatever the authorizer says.
    """

    def __init__(self, database: str, *, protected: Iterable[str] = (), **kwargs: Any) -> None:
        kwargs["cached_statements"] = 0
        super().__init__(database, **kwargs)
        self.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
        self._policy = _Policy(frozenset(protected))
        self.set_authorizer(self._policy.authorize)
        # Functions in the database's own schema (a snapshot's triggers, views, defaults)
        # must be harmless ones, and its virtual tables are not used from them.
        self.execute("PRAGMA trusted_schema = OFF")

    def replay(self, statement: str) -> None:
        """Run one journalled statement; Refused if it asks for anything lightningd never
        does (sqlite3.Error for any other failure)."""
        p = self._policy
        p.set_strict(True)
        p.refusal = None
        try:
            self.execute(statement).close()
        except sqlite3.DatabaseError as e:
            if p.refusal is not None:
                raise Refused(_kind(statement), statement, f"it asks for {p.refusal}") from e
            raise
        finally:
            p.set_strict(False)


def connect(path: str, *, protected: Iterable[str] = (), **kwargs: Any) -> GuardedConnection:
    """A GuardedConnection to `path` (keyword arguments as sqlite3.connect's). `protected`:
    tables a replayed statement may not touch (the replica's own state table)."""
    return GuardedConnection(path, protected=protected, **kwargs)
