"""pyln-client wiring: options, the db_write hook, the shutdown subscription, init.

Decisions live in hook.py and below; nothing here touches the disk.
"""

from __future__ import annotations

from typing import Any, List

from pyln.client import Plugin

from .config import (
    BATCH_KB_DEFAULT,
    BATCH_SECONDS_DEFAULT,
    COMPACT_MIN_KB_DEFAULT,
    COMPACT_RATIO_DEFAULT,
    KEEP_GENERATIONS_DEFAULT,
    LED_DIR_DEFAULT,
    MIN_FREE_MB_DEFAULT,
    MODE_DEFAULT,
    PREALLOCATE_KB_DEFAULT,
    SEGMENT_SIZE_DEFAULT,
    SHIP_INTERVAL_DEFAULT,
    SHIP_PORT_DEFAULT,
    SHIP_WARN_AFTER_DEFAULT,
)
from .filter import DEFAULT_FILTER, FILTERABLE
from .hook import HookHandler

plugin = Plugin()
handler = HookHandler(lambda message, level: plugin.log(message, level=level))

plugin.add_option(
    "pibackup-destination",
    None,
    "Absolute path of an empty directory on the backup medium (USB stick, second SD card), e.g. /media/usb/pibackup. "
    "Required. Give it more than once to keep a full backup on each medium.",
    multi=True,
)
plugin.add_option(
    "pibackup-on-destination-failure",
    "halt",
    "With several destinations, when one fails: halt (stop lightningd, as with one) or continue-degraded "
    "(go on with the others and warn; it rejoins when usable again).",
)
plugin.add_option(
    "pibackup-live-db",
    None,
    "lightningd's database, if pibackup cannot find it by itself: a path or the sqlite3:// DSN "
    "given to wallet=. Default: wallet= from lightningd's command line or config, else "
    "lightningd.sqlite3 in the network directory.",
)
plugin.add_option(
    "pibackup-filter-tables",
    ",".join(DEFAULT_FILTER),
    "Comma-separated tables whose rows are not backed up because lightningd rebuilds them from the "
    "chain (schema is kept), or 'none'. Only " + ", ".join(sorted(FILTERABLE)) + " can be filtered.",
)
plugin.add_option(
    "pibackup-batch-seconds",
    BATCH_SECONDS_DEFAULT,
    "Chain-bookkeeping transactions (blocks, utxoset) may wait this long in memory before they are "
    "written; channel state is always written and synced before lightningd commits. 0: sync every one.",
    opt_type="int",
)
plugin.add_option(
    "pibackup-batch-kb",
    BATCH_KB_DEFAULT,
    "Write waiting chain-bookkeeping transactions once they reach this many KiB.",
    opt_type="int",
)
plugin.add_option(
    "pibackup-preallocate-kb",
    PREALLOCATE_KB_DEFAULT,
    "Extend journal segments with zeros this many KiB at a time, so that an append does not change "
    "the file's size (fewer metadata writes per sync); at most 1/16 of the snapshot's size. 0: off.",
    opt_type="int",
)
plugin.add_option(
    "pibackup-led",
    "none",
    "A board LED to show the backup's health: heartbeat when fine, fast blink on a warning, steady on "
    "when the backup failed. ACT on current Raspberry Pis, led0 on older ones; none for no LED.",
)
plugin.add_option(
    "pibackup-led-dir",
    LED_DIR_DEFAULT,
    "Where the LEDs are (sysfs).",
)
plugin.add_option(
    "pibackup-min-free-mb",
    MIN_FREE_MB_DEFAULT,
    "Warn (log, systemd status, LED) when the backup medium has less free space than this.",
    opt_type="int",
)
plugin.add_option(
    "pibackup-segment-size",
    SEGMENT_SIZE_DEFAULT,
    "Size at which a journal segment file is closed and a new one begun: 64K to 1G.",
)
plugin.add_option(
    "pibackup-ship",
    None,
    "Also keep a copy on another host, sent with rsync over ssh in the background: [user@]host:/path "
    "(a directory of its own). Off when not set.",
)
plugin.add_option("pibackup-ship-port", SHIP_PORT_DEFAULT, "The ssh port of the pibackup-ship host.", opt_type="int")
plugin.add_option(
    "pibackup-ship-identity",
    None,
    "The ssh private key to log in with (absolute path). Default: ssh's own (~/.ssh/id_* of lightningd's user).",
)
plugin.add_option(
    "pibackup-ship-known-hosts",
    None,
    "The known_hosts file holding the ship host's key (ssh never accepts an unknown key). "
    "Default: ~/.ssh/known_hosts of lightningd's user.",
)
plugin.add_option(
    "pibackup-ship-interval",
    SHIP_INTERVAL_DEFAULT,
    "Seconds between shipping rounds: the remote copy is at most this far behind.",
    opt_type="int",
)
plugin.add_option(
    "pibackup-ship-warn-after",
    SHIP_WARN_AFTER_DEFAULT,
    "Warn (log, systemd status, LED) when the remote copy has been behind this many seconds.",
    opt_type="int",
)
plugin.add_option(
    "pibackup-ship-encrypt-key",
    None,
    "Encrypt everything shipped with this key file (create it with: pibackup keygen FILE, and keep a "
    "copy away from the Pi). The remote host can then neither read nor undetectably alter the copy.",
)

# Compaction (issue #5)
plugin.add_option(
    "pibackup-compact-ratio",
    COMPACT_RATIO_DEFAULT,
    "Compact the backup automatically when its journal grows past this multiple of its snapshot's size: "
    "a new generation's snapshot is built in the background from the old snapshot and journal. 0: only "
    "on lightning-cli pibackup-compact.",
)
plugin.add_option(
    "pibackup-compact-min-kb",
    COMPACT_MIN_KB_DEFAULT,
    "Never compact automatically while the journal is smaller than this many KiB.",
    opt_type="int",
)
plugin.add_option(
    "pibackup-keep-generations",
    KEEP_GENERATIONS_DEFAULT,
    "How many backup generations to keep, counting the one a compaction is building; older ones are "
    "deleted only once a newer one is complete and synced.",
    opt_type="int",
)

# Replica mode (issue #5)
plugin.add_option(
    "pibackup-mode",
    MODE_DEFAULT,
    "journal: a snapshot plus a checksummed journal, compacted in the background (the default). replica: a "
    "second SQLite database kept in step, one transaction per data_version.",
)


@plugin.hook("db_write")
def on_db_write(plugin: Plugin, data_version: int, writes: List[str], **kwargs: Any) -> Any:
    return handler.on_db_write(data_version, writes)


@plugin.method("pibackup-status")
def pibackup_status(plugin: Plugin, **kwargs: Any) -> Any:
    """Show pibackup's state: health, warnings, destinations and free space, generation,
    last data_version, the writer's counters, uptime."""
    return handler.status()


@plugin.method("pibackup-compact")
def pibackup_compact(plugin: Plugin, **kwargs: Any) -> Any:
    """Compact the backup now, in the background: build a new generation's snapshot from the
    current one and its journal. Watch pibackup-status for the result. Refused (with a
    reason) while the current generation is marked damaged: lightningd's next write
    replaces it from the live database."""
    return handler.compact()


@plugin.init()
def on_init(options: Any, configuration: Any, plugin: Plugin, **kwargs: Any) -> None:
    handler.on_init(options, configuration)


@plugin.subscribe("shutdown")
def on_shutdown(plugin: Plugin, **kwargs: Any) -> None:
    # Not exiting here is deliberate: lightningd still commits transactions after
    # this notification, and each must reach the backup. We leave when stdin closes.
    handler.on_shutdown()


def main() -> None:
    try:
        plugin.run()
    finally:
        handler.close()
