"""The documentation follows the code: the options page is what the options table generates,
every `pibackup-...` name the docs mention exists, and the docs carry no project history."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pibackup.app.options import BY_NAME, options_page

ROOT = Path(__file__).resolve().parents[2]
OPTIONS_PAGE = ROOT / "docs" / "guide" / "options.md"
MAN_PAGE = ROOT / "packaging" / "man" / "pibackup.1"


def _doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _rpc_methods() -> set[str]:
    # Read from plugin.py's decorators rather than by importing it: that would start a Plugin.
    source = (ROOT / "pibackup" / "app" / "plugin.py").read_text()
    return set(re.findall(r'@plugin\.method\("([^"]+)"\)', source))


def test_the_options_page_is_what_make_docs_writes():
    assert OPTIONS_PAGE.read_text() == options_page(), "docs/guide/options.md is stale: run `make docs`"


def test_every_option_has_a_row_on_the_options_page():
    page = OPTIONS_PAGE.read_text()
    for name in BY_NAME:
        assert f"| `{name}` |" in page


# `pibackup-` followed by a name, not as part of a longer word or a path suffix (.pibackup-tmp).
_MENTION = re.compile(r"(?<![\w.\-/])pibackup-[a-z0-9]+(?:-[a-z0-9]+)*")


def _mentions(text: str) -> set[str]:
    return set(_MENTION.findall(text))


def test_the_mention_pattern_finds_options_and_skips_file_names():
    text = "set `pibackup-ship-port=22`; restore writes OUTPUT_DB.pibackup-tmp; pibackup-status"
    assert _mentions(text) == {"pibackup-ship-port", "pibackup-status"}


@pytest.mark.parametrize("path", [*_doc_files(), MAN_PAGE], ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_mention_only_options_and_methods_that_exist(path):
    text = path.read_text()
    if path.suffix == ".1":
        text = text.replace("\\-", "-")  # roff's hyphen
    known = set(BY_NAME) | _rpc_methods()
    unknown = sorted(_mentions(text) - known)
    assert not unknown, f"{path.relative_to(ROOT)} mentions {unknown}, which are neither options nor RPC methods"


_HEX = re.compile(r"\b[0-9a-f]{7,40}\b")
_NOT_HASHES = {"ed25519"}  # words that look like a short hash
_ISSUE = re.compile(r"(?<![\w&/])#\d+\b")
_SESSION = re.compile(r"\b(?:this|that|last|previous|earlier|next|until the) session\b", re.IGNORECASE)


def _history(text: str) -> list[str]:
    """Commit hashes, issue references and notes about work sessions, each with its context."""
    found = []
    for m in _HEX.finditer(text):
        token = m.group()
        if token in _NOT_HASHES:
            continue
        near = text[max(0, m.start() - 60) : m.end() + 60].lower()
        mixed = re.search(r"\d", token) and re.search(r"[a-f]", token)
        if mixed or "commit" in near:
            found.append(f"{token!r} in ...{near}...")
    found += [f"{m.group()!r}" for m in _ISSUE.finditer(text)]
    found += [f"{m.group()!r}" for m in _SESSION.finditer(text)]
    return found


def test_the_history_check_finds_hashes_issues_and_sessions():
    assert len(_history("measured at commit e874015")) == 1
    assert len(_history("the run at d222b9f")) == 1
    assert len(_history("against issue #5's targets")) == 1
    assert len(_history("Until this session it ran at nice 19")) == 1
    assert _history("two lightningd sessions; 1,795,846,422 bytes; `00 00 FF FF`; ssh-keygen -t ed25519") == []


@pytest.mark.parametrize("path", _doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_hold_no_commit_hashes_issue_numbers_or_session_notes(path):
    found = _history(path.read_text())
    assert not found, f"{path.relative_to(ROOT)}: write the fact in the present tense instead of {found}"


def test_relative_links_in_the_docs_lead_to_files_that_exist():
    for path in _doc_files():
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if "://" in target:
                continue
            assert (path.parent / target).exists(), f"{path.relative_to(ROOT)} links to {target}, which does not exist"
