"""The plugin's options (set in lightningd's config file), checked and turned into a Config.

Option names and help texts live in plugin.py; values are judged here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, FrozenSet, Mapping, Optional

from .errors import PibackupError
from .filter import parse_filter

SEGMENT_MB_DEFAULT = 32
SEGMENT_MB_MAX = 1024  # well under FAT32's 4 GiB file limit


class ConfigError(PibackupError):
    pass


BATCH_SECONDS_DEFAULT = 30
BATCH_SECONDS_MAX = 3600
BATCH_KB_DEFAULT = 256
BATCH_KB_MAX = 16 * 1024


@dataclass(frozen=True)
class Config:
    destination: str
    live_db: Optional[str]
    segment_bytes: int
    filter_tables: FrozenSet[str]
    batch_seconds: int
    batch_bytes: int


def _int(options: Mapping[str, Any], name: str, default: int, low: int, high: int, unit: str) -> int:
    raw = options.get(name, default)
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={raw!r} is not a whole number of {unit} (default {default})")
    if not low <= value <= high:
        raise ConfigError(f"{name}={value} is out of range: give {low} to {high} {unit} (default {default})")
    return value


def parse_options(options: Mapping[str, Any]) -> Config:
    dest = options.get("pibackup-destination")
    if dest is not None and not isinstance(dest, str):
        raise ConfigError("pibackup-destination must be a path")
    live = options.get("pibackup-live-db") or None
    seg_mb = _int(options, "pibackup-segment-mb", SEGMENT_MB_DEFAULT, 1, SEGMENT_MB_MAX, "megabytes")
    batch_s = _int(options, "pibackup-batch-seconds", BATCH_SECONDS_DEFAULT, 0, BATCH_SECONDS_MAX, "seconds")
    batch_kb = _int(options, "pibackup-batch-kb", BATCH_KB_DEFAULT, 1, BATCH_KB_MAX, "KiB")
    tables = options.get("pibackup-filter-tables")
    if tables is not None and not isinstance(tables, str):
        raise ConfigError("pibackup-filter-tables must be a comma-separated list of tables, or none")
    return Config(
        destination=dest or "",
        live_db=live,
        segment_bytes=seg_mb * 1024 * 1024,
        filter_tables=parse_filter(tables),
        batch_seconds=batch_s,
        batch_bytes=batch_kb * 1024,
    )
