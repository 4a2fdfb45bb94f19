"""Set-ups that look fine until the day they matter, caught at start: a destination on the
medium that holds lightningd's database, and pibackup loaded with plugin= instead of
important-plugin=. Each is a warning (log, status line, RPC, LED), never a halt.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from pibackup.app.livedb import lightningd_args
from pibackup.store.medium import medium

_INCLUDE_DEPTH = 4  # config files may include others; lightningd refuses deeper nesting anyway


def same_medium_warning(destination: str, live_db: str) -> Optional[str]:
    """A destination that dies with the database it backs up.

    st_dev first: one file system, whatever path leads there (a bind mount of a directory on
    the SD card has the card's st_dev). Then the physical disk (store/medium.py): another
    partition of the same card, or another btrfs subvolume, has an st_dev of its own but
    fails with the card. A loop-mounted image kept on the card is not seen through."""
    try:
        d, live = os.stat(destination), os.stat(live_db)
    except OSError:
        return None  # a destination gone already: its writer says so
    if d.st_dev == live.st_dev:
        where = "on the same file system as"
    else:
        try:
            shared = medium(destination) == medium(live_db)
        except OSError:
            return None
        if not shared:
            return None
        where = f"on the same disk ({medium(live_db)}) as"
    return (
        f"the backup in {destination} is {where} lightningd's database {live_db}: when that card or disk dies, the "
        f"backup dies with it. Put pibackup-destination on a USB stick or another disk (pibackup check {destination} "
        "shows its medium); for a copy kept there on purpose beside others, set pibackup-allow-same-medium=true"
    )


@dataclass(frozen=True)
class Loaded:
    """How lightningd's command line and config files load a plugin: `how` is the option
    (important-plugin, plugin or plugin-dir), `where` the file or "the command line"."""

    how: str
    where: str


def _options_in_args(args: Sequence[str]) -> List[Tuple[str, str]]:
    """(name, value) of every --name=value and --name value pair on lightningd's command line."""
    out = []
    for i, a in enumerate(args):
        if not a.startswith("--"):
            continue
        name, eq, value = a[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                continue
            value = args[i + 1]
        out.append((name, value))
    return out


def _options_in_config(path: str, depth: int = 0) -> List[Tuple[str, str, str]]:
    """(name, value, file) of a config file's name=value lines, its `include`s followed."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        line = line.strip()
        if line.startswith("include ") and depth < _INCLUDE_DEPTH:
            inc = line[len("include ") :].strip()
            out += _options_in_config(os.path.join(os.path.dirname(path), os.path.expanduser(inc)), depth + 1)
            continue
        name, eq, value = line.partition("=")
        if eq and not line.startswith("#"):
            out.append((name.strip(), value.strip(), path))
    return out


def _is_us(value: str, plugin: str, base: str) -> bool:
    """Does a plugin= value name this plugin? Relative values are lightningd's to resolve
    (from where it was started): the file name is compared then."""
    path = os.path.expanduser(value)
    if os.path.isabs(path):
        return os.path.realpath(path) == os.path.realpath(plugin)
    return os.path.realpath(os.path.join(base, path)) == os.path.realpath(plugin) or os.path.basename(path) == os.path.basename(plugin)


def how_loaded(plugin: str, lightning_dir: str, args: Sequence[str]) -> Optional[Loaded]:
    """How lightningd (its command line `args`) and its config files load `plugin`; None when
    nothing there names it. `lightning_dir` is the network directory."""
    found: List[Tuple[str, str, str]] = [(n, v, "the command line") for n, v in _options_in_args(args)]
    conf = next((v for n, v, _ in found if n == "conf"), None)
    top = next((v for n, v, _ in found if n == "lightning-dir"), os.path.dirname(os.path.normpath(lightning_dir)))
    for path in [conf] if conf else [os.path.join(top, "config"), os.path.join(lightning_dir, "config")]:
        found += _options_in_config(path)
    plain: Optional[Loaded] = None
    for name, value, where in found:
        if name == "important-plugin" and _is_us(value, plugin, lightning_dir):
            return Loaded(name, where)
        if name == "plugin" and _is_us(value, plugin, lightning_dir):
            plain = plain or Loaded(name, where)
        if name == "plugin-dir" and os.path.realpath(os.path.expanduser(value)) == os.path.dirname(os.path.realpath(plugin)):
            plain = plain or Loaded(name, where)
    return plain


def is_lightningd(args: Sequence[str]) -> bool:
    return bool(args) and os.path.basename(args[0]) == "lightningd"


def plugin_line_warning(plugin: str, lightning_dir: str, args: Optional[Sequence[str]] = None) -> Optional[str]:
    """A warning unless lightningd loads pibackup with important-plugin=. Nothing when the
    parent process is not lightningd (a test driver, a wrapper): then it cannot be told."""
    args = lightningd_args() if args is None else list(args)
    if not is_lightningd(args):
        return None
    loaded = how_loaded(plugin, lightning_dir, args)
    if loaded is not None and loaded.how == "important-plugin":
        return None
    fix = (
        f"load it with important-plugin={os.path.realpath(plugin)} instead (lightningd then stops when pibackup "
        "cannot go on) and restart lightningd"
    )
    gap = "if pibackup dies, lightningd goes on committing without a backup (a silent gap)"
    if loaded is None:
        return (
            "lightningd's command line and config files do not load pibackup with important-plugin= (was it "
            f"started with lightning-cli plugin start, or from a plugins directory?): {gap}; {fix}"
        )
    option = f"{loaded.how}=" if loaded.how != "plugin-dir" else "plugin-dir= (a plugins directory)"
    return f"pibackup is loaded with {option} in {loaded.where}, not important-plugin=: {gap}; {fix}"


def start_warnings(destinations: Sequence[str], live_db: str, allow_same_medium: bool, plugin: str, lightning_dir: str) -> List[str]:
    """Every trap found at start, as warnings for the status (checked once: neither changes
    while lightningd runs)."""
    out: List[str] = []
    if not allow_same_medium:
        out += [w for w in (same_medium_warning(d, live_db) for d in destinations) if w]
    w = plugin_line_warning(plugin, lightning_dir)
    if w:
        out.append(w)
    return out
