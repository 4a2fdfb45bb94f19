"""pyln-client wiring: options, the db_write hook, the shutdown subscription, init.

Decisions live in hook.py and below; nothing here touches the disk.
"""

from __future__ import annotations

from typing import Any, List

from pyln.client import Plugin

from pibackup.app.hook import HookHandler
from pibackup.app.options import OPTIONS

plugin = Plugin()
handler = HookHandler(lambda message, level: plugin.log(message, level=level))

# Every option, its default and its help text come from one table (options.py), which also
# writes docs/guide/options.md.
for _option in OPTIONS:
    plugin.add_option(_option.name, _option.default, _option.help, opt_type=_option.opt_type, multi=_option.multi)


@plugin.hook("db_write")
def on_db_write(plugin: Plugin, data_version: int, writes: List[str], **kwargs: Any) -> Any:
    return handler.on_db_write(data_version, writes)


@plugin.method("pibackup-status")
def pibackup_status(plugin: Plugin, **kwargs: Any) -> Any:
    """Show pibackup's state: health, warnings, destinations and free space, generation,
    last data_version, the writer's counters, uptime, the node id and network the backup
    belongs to, and whether it holds lightningd's emergency.recover."""
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
    # Not exiting here: lightningd still commits transactions after this notification, and
    # each must reach the backup. The handler leaves once they are over (or stdin closes).
    handler.on_shutdown()


def main() -> None:
    try:
        plugin.run()
    finally:
        handler.close()
