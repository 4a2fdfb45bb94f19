"""The framed messages between the plugin (sender) and `pibackup serve` (receiver), one ssh
session's stdin and stdout (docs/REMOTE-PROTOCOL.md is the specification).

Every message: a fixed header (magic, type, sequence number, lengths), a JSON object of
named fields, raw data, and a CRC-32 over all of it. A reader checks the magic, then the
lengths against its caps, then the checksum, before it trusts a single field.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Dict

from pibackup.errors import PibackupError

MAGIC = b"PBRM"
# The version of what messages mean, exchanged in HELLO and WELCOME. The frame (this
# module's header) never changes, so two versions can always tell each other so.
PROTOCOL_VERSION = 1
HEADER = struct.Struct("<4sBxxxQII")  # magic, type, reserved, sequence, meta length, data length
CRC = struct.Struct("<I")
META_MAX = 1 << 20
DATA_MAX = 4 << 20  # a chunk of a snapshot, or a burst of journal frames
CHUNK_BYTES = 1 << 20  # what a sender puts in one message

# Types. The sender sends HELLO first and then only operations; the receiver answers each
# message it gets, in order, with WELCOME (to HELLO), ACK or ERROR.
HELLO, WELCOME, APPEND, PUT, FINISH, HEAD, ACK, ERROR, BYE = range(1, 10)
NAMES = {HELLO: "HELLO", WELCOME: "WELCOME", APPEND: "APPEND", PUT: "PUT", FINISH: "FINISH", HEAD: "HEAD"}
NAMES.update({ACK: "ACK", ERROR: "ERROR", BYE: "BYE"})


class ProtocolError(PibackupError):
    """The stream is not what the protocol says: garbage, cut short, or a failed checksum."""


class PeerClosed(ProtocolError):
    """The other end closed the stream between two messages."""


@dataclass
class Message:
    type: int
    seq: int
    meta: Dict[str, Any] = field(default_factory=dict)
    data: bytes = b""

    @property
    def name(self) -> str:
        return NAMES.get(self.type, f"type {self.type}")


def encode(msg: Message) -> bytes:
    meta = json.dumps(msg.meta, separators=(",", ":"), sort_keys=True).encode()
    if len(meta) > META_MAX or len(msg.data) > DATA_MAX:
        raise ValueError(f"a {msg.name} message too large to send ({len(meta)} + {len(msg.data)} bytes)")
    head = HEADER.pack(MAGIC, msg.type, msg.seq, len(meta), len(msg.data))
    crc = zlib.crc32(msg.data, zlib.crc32(meta, zlib.crc32(head)))
    return head + meta + msg.data + CRC.pack(crc)


def _exactly(stream: BinaryIO, n: int, what: str, started: bool) -> bytes:
    out = bytearray()
    while len(out) < n:
        piece = stream.read(n - len(out))
        if not piece:
            if not out and not started:
                raise PeerClosed("the other end closed the connection")
            raise ProtocolError(f"the stream ends inside a message ({what}: {len(out)} of {n} bytes)")
        out += piece
    return bytes(out)


def read_message(stream: BinaryIO) -> Message:
    """The next message, checked whole; ProtocolError says what was wrong with it."""
    head = _exactly(stream, HEADER.size, "header", started=False)
    magic, mtype, seq, meta_len, data_len = HEADER.unpack(head)
    if magic != MAGIC:
        text = head.decode("utf-8", "replace").strip()
        raise ProtocolError(f"not a pibackup message (it starts with {head[:16]!r}: {text[:40]!r})")
    if mtype not in NAMES:
        raise ProtocolError(f"unknown message type {mtype}")
    if meta_len > META_MAX or data_len > DATA_MAX:
        raise ProtocolError(f"a message claims {meta_len} + {data_len} bytes, more than the protocol allows")
    meta = _exactly(stream, meta_len, "fields", started=True)
    data = _exactly(stream, data_len, "data", started=True)
    (crc,) = CRC.unpack(_exactly(stream, CRC.size, "checksum", started=True))
    if crc != zlib.crc32(data, zlib.crc32(meta, zlib.crc32(head))):
        raise ProtocolError(f"message {seq} ({NAMES[mtype]}) fails its checksum: damaged on the way")
    try:
        fields = json.loads(meta.decode("utf-8")) if meta else {}
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(f"message {seq} ({NAMES[mtype]}) has unreadable fields: {e}") from e
    if not isinstance(fields, dict):
        raise ProtocolError(f"message {seq} ({NAMES[mtype]}) has fields that are not an object")
    return Message(mtype, seq, fields, data)
