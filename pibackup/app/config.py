"""The plugin's options (set in lightningd's config file), checked and turned into a Config.

Names, defaults, ranges and help texts live in options.py (one table); values are judged here.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, FrozenSet, Mapping, Optional, Tuple

from pibackup.app.options import (
    BY_NAME,
    COMPACT_RATIO_MAX,
    COMPACT_RATIO_MIN,
    DESTINATION_FAILURE_POLICIES,
    MODES,
    SEGMENT_MAX,
    SEGMENT_MIN,
    default,
)
from pibackup.errors import PibackupError
from pibackup.rules.filter import parse_filter

if TYPE_CHECKING:
    from pibackup.copies.target import ShipConfig

SEGMENT_SIZE_DEFAULT = str(default("pibackup-segment-size"))
_SIZE = re.compile(r"^\s*(\d+)\s*([KkMmGg]?)i?[Bb]?\s*$")


class ConfigError(PibackupError):
    pass


def _int_default(name: str) -> int:
    value = default(name)
    assert isinstance(value, int), name
    return value


BATCH_SECONDS_DEFAULT = _int_default("pibackup-batch-seconds")
BATCH_KB_DEFAULT = _int_default("pibackup-batch-kb")
LED_DIR_DEFAULT = str(default("pibackup-led-dir"))
MIN_FREE_MB_DEFAULT = _int_default("pibackup-min-free-mb")
PREALLOCATE_KB_DEFAULT = _int_default("pibackup-preallocate-kb")
SHIP_PORT_DEFAULT = _int_default("pibackup-ship-port")
SHIP_INTERVAL_DEFAULT = _int_default("pibackup-ship-interval")
SHIP_WARN_AFTER_DEFAULT = _int_default("pibackup-ship-warn-after")
SHIP_OPTIONS = tuple(name for name in BY_NAME if name.startswith("pibackup-ship-"))
COMPACT_RATIO_DEFAULT = str(default("pibackup-compact-ratio"))
COMPACT_MIN_KB_DEFAULT = _int_default("pibackup-compact-min-kb")
KEEP_GENERATIONS_DEFAULT = _int_default("pibackup-keep-generations")
MODE_DEFAULT = str(default("pibackup-mode"))
ON_DESTINATION_FAILURE_DEFAULT = str(default("pibackup-on-destination-failure"))


@dataclass(frozen=True)
class Config:
    destination: str  # the first of `destinations`
    live_db: Optional[str]
    segment_bytes: int
    filter_tables: FrozenSet[str]
    batch_seconds: int
    batch_bytes: int
    preallocate_bytes: int
    led: Optional[str] = None
    led_dir: str = LED_DIR_DEFAULT
    min_free_bytes: int = MIN_FREE_MB_DEFAULT * 1024 * 1024
    ship: Optional[ShipConfig] = None
    destinations: Tuple[str, ...] = ()
    on_destination_failure: str = ON_DESTINATION_FAILURE_DEFAULT
    # compaction
    compact_ratio: float = float(COMPACT_RATIO_DEFAULT)
    compact_min_bytes: int = COMPACT_MIN_KB_DEFAULT * 1024
    keep_generations: int = KEEP_GENERATIONS_DEFAULT
    mode: str = MODE_DEFAULT
    allow_same_medium: bool = False  # no warning for a destination on the live database's medium
    remotes: Tuple[Any, ...] = ()  # remote/config.py RemoteConfig, one per pibackup-remote


def parse_size(name: str, raw: Any) -> int:
    """A size such as 32M, 512K or 1G (binary units)."""
    m = _SIZE.match(str(raw))
    if not m:
        raise ConfigError(f"{name}={raw!r} is not a size: write it like 32M or 512K (default {SEGMENT_SIZE_DEFAULT})")
    value = int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]
    if not SEGMENT_MIN <= value <= SEGMENT_MAX:
        raise ConfigError(f"{name}={raw} is out of range: give 64K to 1G (default {SEGMENT_SIZE_DEFAULT})")
    return value


def _int(options: Mapping[str, Any], name: str) -> int:
    """An int option, in the range and unit its row of the options table gives."""
    opt = BY_NAME[name]
    default, low, high, unit = opt.default, opt.low, opt.high, opt.unit
    assert isinstance(default, int) and low is not None and high is not None, name
    raw = options.get(name, default)
    try:
        value = int(raw)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"{name}={raw!r} is not a whole number of {unit} (default {default})")
    if not low <= value <= high:
        raise ConfigError(f"{name}={value} is out of range: give {low} to {high} {unit} (default {default})")
    return value


def parse_options(options: Mapping[str, Any]) -> Config:
    dests = _destinations(options.get("pibackup-destination"))
    dest = dests[0] if dests else None
    policy = str(options.get("pibackup-on-destination-failure") or ON_DESTINATION_FAILURE_DEFAULT).strip()
    if policy not in DESTINATION_FAILURE_POLICIES:
        raise ConfigError(f"pibackup-on-destination-failure={policy!r}: give halt (the default) or continue-degraded")
    live = options.get("pibackup-live-db") or None
    segment_bytes = parse_size("pibackup-segment-size", options.get("pibackup-segment-size", SEGMENT_SIZE_DEFAULT))
    batch_s = _int(options, "pibackup-batch-seconds")
    batch_kb = _int(options, "pibackup-batch-kb")
    tables = options.get("pibackup-filter-tables")
    if tables is not None and not isinstance(tables, str):
        raise ConfigError("pibackup-filter-tables must be a comma-separated list of tables, or none")
    return Config(
        destination=dest or "",
        live_db=live,
        segment_bytes=segment_bytes,
        filter_tables=parse_filter(tables),
        batch_seconds=batch_s,
        batch_bytes=batch_kb * 1024,
        preallocate_bytes=_int(options, "pibackup-preallocate-kb") * 1024,
        led=_led(options.get("pibackup-led")),
        led_dir=str(options.get("pibackup-led-dir") or LED_DIR_DEFAULT),
        min_free_bytes=_int(options, "pibackup-min-free-mb") * 1024 * 1024,
        ship=parse_ship(options),
        destinations=tuple(dests),
        on_destination_failure=policy,
        compact_ratio=_ratio(options.get("pibackup-compact-ratio", COMPACT_RATIO_DEFAULT)),
        compact_min_bytes=_int(options, "pibackup-compact-min-kb") * 1024,
        keep_generations=_int(options, "pibackup-keep-generations"),
        mode=_mode(options),
        allow_same_medium=_true_false(options, "pibackup-allow-same-medium"),
        remotes=parse_remote_options(options),
    )


def parse_remote_options(options: Mapping[str, Any]) -> Tuple[Any, ...]:
    """pibackup-remote (given once or more) and its companions; () when off."""
    specs = options.get("pibackup-remote")
    if specs is None or specs == [] or _given(options, "pibackup-remote") == "[]":
        return ()
    from pibackup.remote.config import parse_remotes  # only when configured: its modules cost RSS

    if str(options.get("pibackup-mode", MODE_DEFAULT)).strip().lower() != "journal":
        raise ConfigError("pibackup-remote needs pibackup-mode=journal (the remote keeps a copy of the journal)")
    return parse_remotes(
        specs,
        _int(options, "pibackup-remote-port"),
        _given(options, "pibackup-remote-identity"),
        _given(options, "pibackup-remote-known-hosts"),
        str(options.get("pibackup-remote-command") or default("pibackup-remote-command")),
        _int(options, "pibackup-remote-timeout"),
        str(options.get("pibackup-remote-on-failure") or default("pibackup-remote-on-failure")),
        _given(options, "pibackup-remote-encrypt-key"),
    )


def _true_false(options: Mapping[str, Any], name: str) -> bool:
    raw = options.get(name, default(name))
    value = str(raw).strip().lower()
    if value not in ("true", "false"):
        raise ConfigError(f"{name}={raw!r}: give true or false (default {default(name)})")
    return value == "true"


def _destinations(value: Any) -> Tuple[str, ...]:
    """pibackup-destination, given once or more (lightningd passes a list for a multi option)."""
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) for v in values):
        raise ConfigError("pibackup-destination must be a path")
    values = [v for v in values if v != ""] or [""]
    seen: dict = {}
    for v in values:
        key = os.path.realpath(v) if v else v
        if key in seen:
            raise ConfigError(f"pibackup-destination {v} is given twice (as {seen[key]}); give each directory once")
        seen[key] = v
    return tuple(values)


def _mode(options: Mapping[str, Any]) -> str:
    """pibackup-mode: journal (snapshot + journal) or replica (a second SQLite database)."""
    raw = options.get("pibackup-mode", MODE_DEFAULT)
    mode = str(raw).strip().lower()
    if mode not in MODES:
        raise ConfigError(f"pibackup-mode={raw!r}: give journal or replica (default {MODE_DEFAULT})")
    if mode == "replica" and _given(options, "pibackup-ship") is not None:
        raise ConfigError(
            "pibackup-mode=replica cannot be shipped (a replica changes in place; rsync can only append): "
            "use pibackup-mode=journal with pibackup-ship"
        )
    dests = options.get("pibackup-destination")
    if mode == "replica" and isinstance(dests, list) and len([d for d in dests if d != ""]) > 1:
        raise ConfigError(
            "pibackup-mode=replica keeps one replica: give pibackup-destination once, or use pibackup-mode=journal "
            "for several destinations"
        )
    return mode


def _ratio(raw: Any) -> float:
    """pibackup-compact-ratio: a decimal number; 0 turns automatic compaction off."""
    try:
        value = float(str(raw).strip())
    except ValueError:
        value = -1.0
    if not (value == 0 or COMPACT_RATIO_MIN <= value <= COMPACT_RATIO_MAX):  # also refuses nan and inf
        raise ConfigError(
            f"pibackup-compact-ratio={raw!r}: give a number from {COMPACT_RATIO_MIN:g} to {COMPACT_RATIO_MAX:g} (journal size as a "
            f"multiple of the snapshot's), or 0 for no automatic compaction (default {COMPACT_RATIO_DEFAULT})"
        )
    return value


def _given(options: Mapping[str, Any], name: str) -> Optional[str]:
    value = options.get(name)
    if value is None or str(value).strip().lower() in ("", "none"):
        return None
    return str(value).strip()


def parse_ship(options: Mapping[str, Any]) -> Optional[ShipConfig]:
    """pibackup-ship and its companions; None when shipping is off."""
    spec = _given(options, "pibackup-ship")
    if spec is None:
        stray = [n for n in SHIP_OPTIONS if _given(options, n) is not None and str(options.get(n)) != str(_SHIP_DEFAULTS.get(n))]
        if stray:
            raise ConfigError(f"{stray[0]} is set but pibackup-ship is not: add pibackup-ship=[user@]host:/path, or remove it")
        return None
    # Only now: shipping's modules cost about 2 MB of RSS that a node without it never needs.
    from pibackup.copies.crypt import load_key
    from pibackup.copies.target import ShipConfig, check_local_file, parse_target

    given = {n: _given(options, n) for n in SHIP_OPTIONS if str(options.get(n)) != str(_SHIP_DEFAULTS.get(n))}
    if spec.startswith("rclone:"):  # clouds and object stores: copies/rclone_target.py
        from pibackup.copies.rclone_target import rclone_ship_config

        key_file = given.get("pibackup-ship-encrypt-key")
        if key_file is not None and not key_file.startswith("/"):
            raise ConfigError(f"pibackup-ship-encrypt-key={key_file} is a relative path; give an absolute path")
        interval, warn_after = _int(options, "pibackup-ship-interval"), _int(options, "pibackup-ship-warn-after")
        return rclone_ship_config(spec, given, interval, warn_after, load_key(key_file) if key_file else None)
    for name in ("pibackup-ship-rclone-config", "pibackup-ship-allow-plaintext"):
        if given.get(name) is not None:
            raise ConfigError(f"{name} is for rclone:REMOTE:path targets; pibackup-ship={spec} goes over ssh: remove {name}")
    target = parse_target(spec)
    for tool, package in (("rsync", "rsync"), ("ssh", "openssh-client")):
        if shutil.which(tool) is None:
            raise ConfigError(f"pibackup-ship needs {tool}, which is not on lightningd's PATH: apt install {package}")
    identity = _given(options, "pibackup-ship-identity")
    known_hosts = _given(options, "pibackup-ship-known-hosts")
    key_file = _given(options, "pibackup-ship-encrypt-key")
    if key_file is not None and not key_file.startswith("/"):
        raise ConfigError(f"pibackup-ship-encrypt-key={key_file} is a relative path; give an absolute path")
    return ShipConfig(
        target=target,
        port=_int(options, "pibackup-ship-port"),
        identity=check_local_file("pibackup-ship-identity", identity) if identity else None,
        known_hosts=check_local_file("pibackup-ship-known-hosts", known_hosts) if known_hosts else None,
        interval=_int(options, "pibackup-ship-interval"),
        warn_after=_int(options, "pibackup-ship-warn-after"),
        key=load_key(key_file) if key_file else None,
    )


# A companion option at its default is what lightningd passes when it is not set.
_SHIP_DEFAULTS = {name: BY_NAME[name].default for name in SHIP_OPTIONS if BY_NAME[name].default is not None}


def _led(value: Any) -> Optional[str]:
    if value is None or str(value).strip().lower() in ("", "none"):
        return None
    name = str(value).strip()
    if "/" in name or name in (".", ".."):
        raise ConfigError(f"pibackup-led={value!r}: give the LED's name, e.g. ACT or led0, or none")
    return name
