"""Imports go one way: down the layers of docs/dev/architecture.md, never round in a cycle.

Every `import` and `from ... import` in pibackup/**/*.py counts, also those inside functions
and under `if TYPE_CHECKING:` (a type-only import still ties the two modules together).
KNOWN lists the wrong-direction imports and cycles that were there when the layers were
drawn; it may only shrink: an entry that no longer occurs fails too, so remove it then."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "pibackup"

# Module prefix -> rank. A module belongs to the longest prefix that matches it.
LAYERS: Dict[str, int] = {
    "pibackup": 0,  # the package itself: __version__
    "pibackup.errors": 0,
    "pibackup.testpoints": 0,
    "pibackup.rules": 1,
    "pibackup.store": 2,
    "pibackup.modes": 3,
    "pibackup.compaction": 4,
    "pibackup.copies": 4,
    "pibackup.fanout": 5,
    "pibackup.remote": 5,  # the synchronous copy: copies' formats and ssh, beside the fan-out
    "pibackup.node": 5,  # restoring a whole node: checks and placement around the restore app/cli runs
    "pibackup.app": 6,
    "pibackup.__main__": 6,
}

KNOWN_VIOLATIONS: Set[str] = set()
KNOWN_CYCLES: Set[str] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> Dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> str:
    return max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)


def imports(module: str, path: Path, known: Set[str]) -> Set[str]:
    """The package's modules that `module` imports, relative imports resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:  # `from pibackup.store import directory` imports a module
                sub = f"{target}.{a.name}"
                found.add(sub if sub in known else target)
    return {m for m in found if m == "pibackup" or m.startswith("pibackup.")}


def graph() -> Dict[str, Set[str]]:
    mods = modules()
    known = set(mods)
    return {m: {t for t in imports(m, p, known) if t != m} for m, p in mods.items()}


def wrong(src: str, dst: str) -> bool:
    """True if src may not import dst."""
    a, b = layer(src), layer(dst)
    if a == b:
        journal, replica = "pibackup.modes.journal", "pibackup.modes.replica"
        return any(src.startswith(x) and dst.startswith(y) for x, y in ((journal, replica), (replica, journal)))
    if LAYERS[a] == 6:  # app and __main__: everything
        return False
    if LAYERS[b] >= LAYERS[a]:  # also compaction <-> copies, and within rank 0
        return True
    if a == "pibackup.copies" and b == "pibackup.modes":
        return True
    if a in ("pibackup.fanout", "pibackup.remote") and b == "pibackup.modes":
        return dst != "pibackup.modes.api"
    return False


def violations(g: Dict[str, Set[str]]) -> Set[str]:
    return {f"{s} -> {d}" for s, targets in g.items() for d in targets if wrong(s, d)}


def cycles(g: Dict[str, Set[str]]) -> Set[str]:
    """Each elementary cycle a DFS meets, written from its smallest module."""
    found: Set[str] = set()
    state: Dict[str, int] = {}  # 1: on the stack, 2: done
    stack: List[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(g.get(m, ())):
            if state.get(t) == 1:
                loop = stack[stack.index(t):]
                i = loop.index(min(loop))
                loop = loop[i:] + loop[:i]
                found.add(" -> ".join(loop + [loop[0]]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    return found


def test_every_module_has_a_layer():
    for m in modules():
        assert layer(m) in LAYERS, m


def test_imports_go_down_the_layers():
    new = violations(graph()) - KNOWN_VIOLATIONS
    assert not new, "imports against the layers (docs/dev/architecture.md):\n" + "\n".join(sorted(new))


def test_no_import_cycles():
    new = cycles(graph()) - KNOWN_CYCLES
    assert not new, "import cycles:\n" + "\n".join(sorted(new))


def test_known_entries_still_occur():
    g = graph()
    gone = (KNOWN_VIOLATIONS - violations(g)) | (KNOWN_CYCLES - cycles(g))
    assert not gone, "fixed, so remove from KNOWN in tests/unit/test_layers.py:\n" + "\n".join(sorted(gone))


def test_the_rules_themselves():
    assert wrong("pibackup.store.segment", "pibackup.modes.api")
    assert wrong("pibackup.rules.filter", "pibackup.store.segment")
    assert wrong("pibackup.errors", "pibackup.rules.filter")
    assert wrong("pibackup.compaction.child", "pibackup.copies.shipper")
    assert wrong("pibackup.copies.shipper", "pibackup.compaction.child")
    assert wrong("pibackup.copies.shipper", "pibackup.modes.api")
    assert wrong("pibackup.modes.replica.writer", "pibackup.modes.journal.restore")
    assert wrong("pibackup.fanout.destinations", "pibackup.modes.journal.writer")
    assert not wrong("pibackup.fanout.destinations", "pibackup.modes.api")
    assert not wrong("pibackup.modes.journal.writer", "pibackup.modes.api")
    assert not wrong("pibackup.compaction.child", "pibackup.modes.journal.restore")
    assert not wrong("pibackup.app.hook", "pibackup.fanout.destinations")
    assert not wrong("pibackup.__main__", "pibackup.app.cli")
    assert not wrong("pibackup.store.chain", "pibackup.store.directory")
    assert not wrong("pibackup.store.segment", "pibackup.testpoints")
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {"a -> b -> c -> a"}
