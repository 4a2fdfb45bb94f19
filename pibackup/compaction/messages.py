"""The messages between the plugin and its compaction process: one JSON object a line (the
start argument in argv), typed here so each side builds and reads them in one place.

Conversation: argv Start; parent -> child Job; then child At / parent More or Done, any
number of times; last the child's result: Built, Nothing or Failed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union


def _line(obj: Dict[str, Any]) -> str:
    return json.dumps(obj) + "\n"


@dataclass(frozen=True)
class Start:
    """argv[1]: the plugin's pid (the child exits if its parent is already another one)."""

    parent: int

    def encode(self) -> str:
        return json.dumps({"parent": self.parent})

    @staticmethod
    def decode(text: str) -> Start:
        return Start(int(json.loads(text)["parent"]))


@dataclass(frozen=True)
class Job:
    """What to compact: the generation's first `segments` segments, the last up to `limit`
    bytes (the cut, whose chain value is `checksum`), into the `.partial` directory."""

    destination: str
    generation: int
    segments: int
    limit: Optional[int]
    checksum: Optional[int]
    partial: str

    def encode(self) -> str:
        return _line(
            {
                "destination": self.destination,
                "generation": self.generation,
                "segments": self.segments,
                "limit": self.limit,
                "checksum": self.checksum,
                "partial": self.partial,
            }
        )

    @staticmethod
    def decode(line: str) -> Job:
        d = json.loads(line)
        return Job(d["destination"], d["generation"], d["segments"], d.get("limit"), d.get("checksum"), d["partial"])


@dataclass(frozen=True)
class At:
    """Child -> parent: replayed up to (segment, offset); how far may it go on?"""

    segment: int
    offset: int

    PREFIX = b'{"at"'  # how the parent tells it from the result line

    def encode(self) -> str:
        return _line({"at": [self.segment, self.offset]})

    @staticmethod
    def decode(line: bytes) -> Optional[At]:
        """None for any other line (the result)."""
        if not line.startswith(At.PREFIX):
            return None
        segment, offset = json.loads(line)["at"]
        return At(segment, offset)


@dataclass(frozen=True)
class More:
    """Parent -> child: the writer has made the journal durable up to (segment, durable bytes)."""

    segment: int
    durable: int

    def encode(self) -> str:
        return _line({"more": [self.segment, self.durable]})


@dataclass(frozen=True)
class Done:
    """Parent -> child: close enough behind the writer, finish the snapshot now."""

    def encode(self) -> str:
        return _line({"done": True})


def decode_reply(line: str) -> Union[More, Done]:
    reply = json.loads(line)
    if "more" not in reply:
        return Done()
    return More(int(reply["more"][0]), int(reply["more"][1]))


@dataclass
class Built:
    """Child -> parent, the result: the new snapshot is in the `.partial`, synced."""

    version: int  # data_version of the new snapshot
    sha256: bytes
    snapshot_bytes: int
    transactions: int  # replayed into it
    pending: List[Tuple[int, int, List[str]]]  # (kind, data_version, statements) not yet known committed
    end: Tuple[int, int] = (0, 0)  # (segment, offset) where the replay stopped: the copy starts there

    def encode(self) -> str:
        return _line(
            {
                "version": self.version,
                "sha256": self.sha256.hex(),
                "snapshot_bytes": self.snapshot_bytes,
                "transactions": self.transactions,
                "pending": self.pending,
                "end": list(self.end),
            }
        )


@dataclass(frozen=True)
class Nothing:
    """Child -> parent, the result: no transaction committed after the snapshot yet."""

    reason: str

    def encode(self) -> str:
        return _line({"nothing": self.reason})


@dataclass(frozen=True)
class Failed:
    """Child -> parent, the result: `damaged` is set only for damage a new generation cures
    (True) or a file the medium could not read (False); absent for other failures."""

    error: str
    damaged: Optional[bool] = field(default=None)

    def encode(self) -> str:
        out: Dict[str, Any] = {"error": self.error}
        if self.damaged is not None:
            out["damaged"] = self.damaged
        return _line(out)


Result = Union[Built, Nothing, Failed]


def decode_result(line: bytes) -> Result:
    d = json.loads(line)
    if "error" in d:
        return Failed(d["error"], d.get("damaged"))
    if "nothing" in d:
        return Nothing(d["nothing"])
    end = d.get("end") or (0, 0)
    return Built(
        int(d["version"]),
        bytes.fromhex(d["sha256"]),
        int(d["snapshot_bytes"]),
        int(d["transactions"]),
        [(int(k), int(v), list(s)) for k, v, s in d["pending"]],
        (int(end[0]), int(end[1])),
    )
