"""The plugin's options (set in lightningd's config file), checked and turned into a Config.

Option names and help texts live in plugin.py; values are judged here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from .errors import PibackupError

SEGMENT_MB_DEFAULT = 32
SEGMENT_MB_MAX = 1024  # well under FAT32's 4 GiB file limit


class ConfigError(PibackupError):
    pass


@dataclass(frozen=True)
class Config:
    destination: str
    live_db: Optional[str]
    segment_bytes: int


def parse_options(options: Mapping[str, Any]) -> Config:
    dest = options.get("pibackup-destination")
    if dest is not None and not isinstance(dest, str):
        raise ConfigError("pibackup-destination must be a path")
    live = options.get("pibackup-live-db") or None
    seg = options.get("pibackup-segment-mb", SEGMENT_MB_DEFAULT)
    try:
        seg_mb = int(seg)
    except (TypeError, ValueError):
        raise ConfigError(f"pibackup-segment-mb={seg!r} is not a whole number of megabytes (default {SEGMENT_MB_DEFAULT})")
    if not 1 <= seg_mb <= SEGMENT_MB_MAX:
        raise ConfigError(f"pibackup-segment-mb={seg_mb} is out of range: give 1 to {SEGMENT_MB_MAX} (default {SEGMENT_MB_DEFAULT})")
    return Config(destination=dest or "", live_db=live, segment_bytes=seg_mb * 1024 * 1024)
