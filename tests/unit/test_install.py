"""The Debian package installs the whole pibackup package: every pibackup/**/*.py is matched
by a line of packaging/debian/pibackup.install that puts it at the same place under
/usr/lib/pibackup (dh_install expands the globs the same way, one folder per line)."""

from __future__ import annotations

import glob
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "packaging" / "debian" / "pibackup.install"


def installed() -> dict:
    """Source file (relative to the checkout) -> where the package puts it."""
    out = {}
    for line in INSTALL.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        source, dest = line.split()
        for f in glob.glob(source, root_dir=ROOT):
            if (ROOT / f).is_file():
                out[f] = str(Path(dest) / Path(f).name)
    return out


def test_every_module_is_installed_where_python_finds_it():
    got = installed()
    modules = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "pibackup").rglob("*.py"))
    assert modules and "pibackup/app/plugin.py" in modules
    missing = [m for m in modules if m not in got]
    assert not missing, f"not in {INSTALL.relative_to(ROOT)}: {missing}"
    misplaced = {m: got[m] for m in modules if got[m] != f"usr/lib/pibackup/{m}"}
    assert not misplaced, misplaced
