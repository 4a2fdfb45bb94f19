"""The plugin's options (set in lightningd's config file), checked and turned into a Config.

Option names and help texts live in plugin.py; values are judged here.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, FrozenSet, Mapping, Optional, Tuple

from .errors import PibackupError
from .filter import parse_filter

if TYPE_CHECKING:
    from .ship import ShipConfig

SEGMENT_SIZE_DEFAULT = "32M"
SEGMENT_MIN = 64 * 1024
SEGMENT_MAX = 1024 * 1024 * 1024  # well under FAT32's 4 GiB file limit
_SIZE = re.compile(r"^\s*(\d+)\s*([KkMmGg]?)i?[Bb]?\s*$")


class ConfigError(PibackupError):
    pass


BATCH_SECONDS_DEFAULT = 30
BATCH_SECONDS_MAX = 3600
BATCH_KB_DEFAULT = 256
BATCH_KB_MAX = 16 * 1024
LED_DIR_DEFAULT = "/sys/class/leds"
MIN_FREE_MB_DEFAULT = 100
PREALLOCATE_KB_DEFAULT = 1024  # make bench: 2-3x fewer device bytes per sync on ext4
SHIP_PORT_DEFAULT = 22
SHIP_INTERVAL_DEFAULT = 60  # a remote copy at most a minute behind; one ssh login a minute
SHIP_WARN_AFTER_DEFAULT = 900  # 15 min: a few missed rounds (a router reboot) stay quiet
SHIP_OPTIONS = (
    "pibackup-ship-port",
    "pibackup-ship-identity",
    "pibackup-ship-known-hosts",
    "pibackup-ship-interval",
    "pibackup-ship-warn-after",
    "pibackup-ship-encrypt-key",
)

# Compaction (issue #5). See README "Compaction" for the measurement behind the ratio.
COMPACT_RATIO_DEFAULT = "0.4"
COMPACT_RATIO_MAX = 100.0
COMPACT_MIN_KB_DEFAULT = 64  # a journal smaller than this is never compacted automatically (the 3x bound needs ratio to rule)
KEEP_GENERATIONS_DEFAULT = 2
MODE_DEFAULT = "journal"
MODES = ("journal", "replica")
KEEP_GENERATIONS_MAX = 100


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
    led_dir: str = "/sys/class/leds"
    min_free_bytes: int = 100 * 1024 * 1024
    ship: Optional[ShipConfig] = None
    destinations: Tuple[str, ...] = ()
    on_destination_failure: str = "halt"
    # compaction
    compact_ratio: float = float(COMPACT_RATIO_DEFAULT)
    compact_min_bytes: int = COMPACT_MIN_KB_DEFAULT * 1024
    keep_generations: int = KEEP_GENERATIONS_DEFAULT
    mode: str = MODE_DEFAULT


def parse_size(name: str, raw: Any) -> int:
    """A size such as 32M, 512K or 1G (binary units)."""
    m = _SIZE.match(str(raw))
    if not m:
        raise ConfigError(f"{name}={raw!r} is not a size: write it like 32M or 512K (default {SEGMENT_SIZE_DEFAULT})")
    value = int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]
    if not SEGMENT_MIN <= value <= SEGMENT_MAX:
        raise ConfigError(f"{name}={raw} is out of range: give 64K to 1G (default {SEGMENT_SIZE_DEFAULT})")
    return value


def _int(options: Mapping[str, Any], name: str, default: int, low: int, high: int, unit: str) -> int:
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
    policy = str(options.get("pibackup-on-destination-failure") or "halt").strip()
    if policy not in ("halt", "continue-degraded"):
        raise ConfigError(f"pibackup-on-destination-failure={policy!r}: give halt (the default) or continue-degraded")
    live = options.get("pibackup-live-db") or None
    segment_bytes = parse_size("pibackup-segment-size", options.get("pibackup-segment-size", SEGMENT_SIZE_DEFAULT))
    batch_s = _int(options, "pibackup-batch-seconds", BATCH_SECONDS_DEFAULT, 0, BATCH_SECONDS_MAX, "seconds")
    batch_kb = _int(options, "pibackup-batch-kb", BATCH_KB_DEFAULT, 1, BATCH_KB_MAX, "KiB")
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
        preallocate_bytes=_int(options, "pibackup-preallocate-kb", PREALLOCATE_KB_DEFAULT, 0, 64 * 1024, "KiB") * 1024,
        led=_led(options.get("pibackup-led")),
        led_dir=str(options.get("pibackup-led-dir") or LED_DIR_DEFAULT),
        min_free_bytes=_int(options, "pibackup-min-free-mb", MIN_FREE_MB_DEFAULT, 0, 1 << 20, "MiB") * 1024 * 1024,
        ship=parse_ship(options),
        destinations=tuple(dests),
        on_destination_failure=policy,
        compact_ratio=_ratio(options.get("pibackup-compact-ratio", COMPACT_RATIO_DEFAULT)),
        compact_min_bytes=_int(options, "pibackup-compact-min-kb", COMPACT_MIN_KB_DEFAULT, 64, 1 << 30, "KiB") * 1024,
        keep_generations=_int(options, "pibackup-keep-generations", KEEP_GENERATIONS_DEFAULT, 1, KEEP_GENERATIONS_MAX, "generations"),
        mode=_mode(options),
    )


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
    if not (value == 0 or 0.05 <= value <= COMPACT_RATIO_MAX):  # also refuses nan and inf
        raise ConfigError(
            f"pibackup-compact-ratio={raw!r}: give a number from 0.05 to {COMPACT_RATIO_MAX:g} (journal size as a "
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
    from .crypt import load_key
    from .ship import ShipConfig, check_local_file, parse_target

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
        port=_int(options, "pibackup-ship-port", SHIP_PORT_DEFAULT, 1, 65535, "(a TCP port)"),
        identity=check_local_file("pibackup-ship-identity", identity) if identity else None,
        known_hosts=check_local_file("pibackup-ship-known-hosts", known_hosts) if known_hosts else None,
        interval=_int(options, "pibackup-ship-interval", SHIP_INTERVAL_DEFAULT, 1, 86400, "seconds"),
        warn_after=_int(options, "pibackup-ship-warn-after", SHIP_WARN_AFTER_DEFAULT, 1, 7 * 86400, "seconds"),
        key=load_key(key_file) if key_file else None,
    )


_SHIP_DEFAULTS = {
    "pibackup-ship-port": SHIP_PORT_DEFAULT,
    "pibackup-ship-interval": SHIP_INTERVAL_DEFAULT,
    "pibackup-ship-warn-after": SHIP_WARN_AFTER_DEFAULT,
}


def _led(value: Any) -> Optional[str]:
    if value is None or str(value).strip().lower() in ("", "none"):
        return None
    name = str(value).strip()
    if "/" in name or name in (".", ".."):
        raise ConfigError(f"pibackup-led={value!r}: give the LED's name, e.g. ACT or led0, or none")
    return name
