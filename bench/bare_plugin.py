#!/usr/bin/env python3
"""The RSS baseline: a pyln-client plugin that hooks db_write and does nothing else."""

from typing import Any

from pyln.client import Plugin

plugin = Plugin()


@plugin.hook("db_write")
def on_db_write(plugin: Plugin, **kwargs: Any) -> Any:
    return {"result": "continue"}


@plugin.subscribe("shutdown")
def on_shutdown(plugin: Plugin, **kwargs: Any) -> None:
    pass


plugin.run()
