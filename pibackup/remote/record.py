"""The head record a sender puts in its remote copy: what the copy holds, up to which
data_version, when, and in which state the sender was (in step, degraded, stopped).
"""

from __future__ import annotations

import os
from typing import Dict, List

from pibackup.copies.head import HeadMaker, seal_head
from pibackup.errors import PibackupError
from pibackup.remote.link import Link
from pibackup.remote.mirror import Mirror
from pibackup.remote.protocol import HEAD
from pibackup.store import directory as dst
from pibackup.store.segment import HEADER_SIZE, decode_header


def send_head(link: Link, maker: HeadMaker, mirror: Mirror, source: str, state: str) -> None:
    """A new head record for what the receiver holds now, when it says something new. The
    receiver writes it after syncing the files, so it never says more than they hold."""
    gens = dst.Destination(source).generations()
    lengths = {rel: h.plain for rel, h in mirror.files.items() if h.final or rel.endswith(".pbj")}
    maker.sender = state
    if gens and gens[-1].segments:  # before the lengths are walked: never later than them
        maker.newest_mtime = os.path.getmtime(gens[-1].segments[-1])
    head = maker.make(gens, lengths, generation_ids(gens))
    if head is None:
        return
    link.send(HEAD, {"generation": head.generation}, seal_head(head, maker.key))
    maker.last_sent = head


def generation_ids(gens: List[dst.Generation]) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for g in gens:
        if g.segments:
            try:
                with open(g.segments[0], "rb") as f:
                    out[g.name] = decode_header(f.read(HEADER_SIZE), g.segments[0]).generation_id.hex()
            except (OSError, PibackupError):
                continue
    return out
