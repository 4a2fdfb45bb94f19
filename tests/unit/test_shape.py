"""Modules and classes stay small enough to read whole.

A module over MODULE_LINES lines needs a `Size:` line in its docstring saying why it is one
piece; a class over CLASS_LINES lines a `# size:` comment on its `class` line or just above
it. KNOWN lists what was oversize when the limits were set; it may only shrink: an entry
that is no longer oversize fails too, so remove it then."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Set

ROOT = Path(__file__).resolve().parents[2]
MODULE_LINES = 400
CLASS_LINES = 250

KNOWN: Set[str] = set()


def _class_excused(lines: list, node: ast.ClassDef) -> bool:
    first = min([node.lineno] + [d.lineno for d in node.decorator_list])
    i = first - 1
    above = []
    while i >= 1 and lines[i - 1].lstrip().startswith("#"):
        above.append(lines[i - 1])
        i -= 1
    return any("# size:" in line for line in [lines[node.lineno - 1], *above])


def oversize() -> Set[str]:
    found: Set[str] = set()
    for path in sorted((ROOT / "pibackup").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        text = path.read_text()
        lines = text.splitlines()
        tree = ast.parse(text, rel)
        doc = ast.get_docstring(tree) or ""
        if len(lines) > MODULE_LINES and not any(line.strip().startswith("Size:") for line in doc.splitlines()):
            found.add(rel)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                if node.end_lineno - node.lineno + 1 > CLASS_LINES and not _class_excused(lines, node):
                    found.add(f"{rel}::{node.name}")
    return found


def test_modules_and_classes_are_not_oversize():
    new = oversize() - KNOWN
    assert not new, (
        f"over {MODULE_LINES} lines (module) or {CLASS_LINES} lines (class); split it, or say why not "
        "(a `Size:` line in the module's docstring, a `# size:` comment on the class):\n" + "\n".join(sorted(new))
    )


def test_known_entries_are_still_oversize():
    gone = KNOWN - oversize()
    assert not gone, "no longer oversize, so remove from KNOWN in tests/unit/test_shape.py:\n" + "\n".join(sorted(gone))
