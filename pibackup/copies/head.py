"""What binds a shipped copy together: its copy id, its node id, and its head record (what
the shipper last put there), so that a reader can tell a copy rolled back or mixed.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from pibackup.copies.crypt import NO_NODE_ID, Binding, CryptError, Encryptor, Key, decrypt_file
from pibackup.errors import PibackupError
from pibackup.store import directory as dst
from pibackup.store import snapfile
from pibackup.store.chain import Walk, walk_segment
from pibackup.store.fsio import write_text_durably
from pibackup.store.layout import COPY_ID_FILE, HEAD, is_generation_name, is_segment_name, is_snapshot_name, segment_filename
from pibackup.store.reader import SegmentReader
from pibackup.store.segment import HEADER_SIZE

HEAD_VERSION = 1
_HEAD_MAX = 1 << 20  # a head record is a few hundred bytes; a reader never takes more
_NODE_ID_SQL = re.compile(r"'node_id'\s*,\s*[xX]'([0-9a-fA-F]{66})'")


class HeadError(PibackupError):
    pass


# --- the copy id ----------------------------------------------------------------------
def copy_id(staging: str) -> bytes:
    """This backup directory's copy id, made (randomly, durably) on first use. Kept apart
    from state.json, whose loss starts the copy afresh but must not make it another copy."""
    path = os.path.join(staging, COPY_ID_FILE)
    try:
        with open(path, encoding="ascii") as f:
            text = f.read(100).strip()
        if re.fullmatch(r"[0-9a-f]{32}", text):
            return bytes.fromhex(text)
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    new = os.urandom(16)
    write_text_durably(path, new.hex() + "\n")
    return new


# --- the node id ----------------------------------------------------------------------
def node_id_of(gen: dst.Generation) -> Optional[bytes]:
    """lightningd's node id (vars row node_id) as the generation holds it: from its snapshot
    (a file at rest: the live database is never touched), or, for a generation that starts
    from an empty database, from the journal's INSERT of it (lightningd writes it in its
    first calls). None when it is not there (yet)."""
    if gen.snapshot is not None and snapfile.is_compressed(gen.snapshot):
        try:
            node = snapfile.read_header(gen.snapshot).node_id
        except (OSError, PibackupError):
            return None
        return node if any(node) else None  # its header carries it; zeros: not there yet
    if gen.snapshot is not None:
        uri = "file:" + urllib.parse.quote(os.path.abspath(gen.snapshot)) + "?mode=ro&immutable=1"
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=1.0)
            try:
                row = conn.execute("SELECT blobval FROM vars WHERE name = 'node_id'").fetchone()
            finally:
                conn.close()
        except sqlite3.Error:
            return None
        value = row[0] if row else None
        return bytes(value) if isinstance(value, bytes) and len(value) == len(NO_NODE_ID) else None
    if not gen.segments:
        return None
    try:
        with SegmentReader(gen.segments[0]) as r:
            for n, frame in enumerate(r.frames()):
                for s in frame.statements:
                    m = _NODE_ID_SQL.search(s) if "node_id" in s else None
                    if m:
                        return bytes.fromhex(m.group(1))
                if n > 5000:  # lightningd writes it in its first transactions
                    break
    except (OSError, PibackupError):
        pass
    return None


# --- the head record ----------------------------------------------------------------------
@dataclass
class Head:
    """What a shipping round put in the copy, written after it got there."""

    copy_id: bytes
    node_id: bytes  # NO_NODE_ID when not known
    generation: str  # the newest generation
    segment: str  # its newest segment
    segment_length: int  # bytes of that segment's valid content in the copy
    data_version: Optional[int]  # of its last frame
    newest_write: Optional[float]  # the local segment's mtime when it was staged
    written: float
    generations: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # name -> id, segments, snapshot
    sender: Optional[str] = None  # a synchronous copy's (pibackup-remote): the sender's state when it wrote this

    def same_content(self, other: Optional[Head]) -> bool:
        return other is not None and {**self.to_json(), "written": 0} == {**other.to_json(), "written": 0}

    def to_json(self) -> Dict[str, Any]:
        return {
            "pibackup_head": HEAD_VERSION,
            "copy_id": self.copy_id.hex(),
            "node_id": "" if self.node_id == NO_NODE_ID else self.node_id.hex(),
            "generation": self.generation,
            "segment": self.segment,
            "segment_length": self.segment_length,
            "data_version": self.data_version,
            "newest_write": None if self.newest_write is None else int(self.newest_write),
            "written": int(self.written),
            "generations": self.generations,
        } | ({} if self.sender is None else {"sender": self.sender})

    def encode(self) -> bytes:
        return (json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")) + "\n").encode()

    @property
    def binding(self) -> Binding:
        return Binding(self.copy_id, self.node_id)


def _hex(value: Any, size: int, what: str) -> bytes:
    if not isinstance(value, str) or not re.fullmatch(f"[0-9a-f]{{{2 * size}}}", value):
        raise HeadError(f"the head record's {what} is not {size} bytes in hex")
    return bytes.fromhex(value)


def _count(value: Any, what: str, nullable: bool = False) -> Any:
    if value is None and nullable:
        return None
    if type(value) is not int or value < 0:
        raise HeadError(f"the head record's {what} is not a count")
    return value


def decode_head(data: bytes) -> Head:
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise HeadError(f"the head record is not JSON: {e}") from e
    if not isinstance(obj, dict) or obj.get("pibackup_head") != HEAD_VERSION:
        raise HeadError("the head record is of an unknown version; use a newer pibackup")
    gens = obj.get("generations")
    if not isinstance(gens, dict):
        raise HeadError("the head record's generations is not an object")
    for name, g in gens.items():
        if not is_generation_name(name) or not isinstance(g, dict):
            raise HeadError(f"the head record names {name!r}, which is not a generation")
        _hex(g.get("id"), 16, f"{name} id")
        _count(g.get("segments"), f"{name} segment count")
        if type(g.get("snapshot")) is not bool:
            raise HeadError(f"the head record's {name} snapshot is not true or false")
    generation, segment = obj.get("generation"), obj.get("segment")
    if not isinstance(generation, str) or generation not in gens or not isinstance(segment, str) or not is_segment_name(segment):
        raise HeadError("the head record's newest generation or segment is not one of its own")
    node = obj.get("node_id")
    return Head(
        copy_id=_hex(obj.get("copy_id"), 16, "copy id"),
        node_id=NO_NODE_ID if node == "" else _hex(node, 33, "node id"),
        generation=generation,
        segment=segment,
        segment_length=_count(obj.get("segment_length"), "segment length"),
        data_version=_count(obj.get("data_version"), "data_version", nullable=True),
        newest_write=_count(obj.get("newest_write"), "newest write time", nullable=True),
        written=_count(obj.get("written"), "time written"),
        generations=gens,
        sender=obj["sender"] if isinstance(obj.get("sender"), str) else None,
    )


def seal_head(head: Head, key: Optional[Key]) -> bytes:
    """The head record's file: JSON, or with a key an encrypted file bound to the copy."""
    if key is None:
        return head.encode()
    enc = Encryptor(key, HEAD, binding=head.binding)
    return enc.header + enc.chunks(head.encode(), final=True)


def read_head(path: str, key: Optional[Key]) -> Head:
    """Read a copy's head record; an encrypted one must be whole, authentic and bound to the
    copy it names."""
    if os.path.getsize(path) > _HEAD_MAX:
        raise HeadError(f"{path} is far larger than a head record: it was altered")
    if key is None:
        with open(path, "rb") as f:
            return decode_head(f.read())
    import io

    out = io.BytesIO()
    d = decrypt_file(path, out, key, HEAD)
    if not d.final:
        raise CryptError(f"{path} is cut short: the head record was altered")
    head = decode_head(out.getvalue())
    if d.binding is None or d.binding != head.binding:
        raise CryptError(f"{path} is not bound to the copy it names: the head record was altered")
    return head


# --- what a reader checks -------------------------------------------------------------------
def shortfalls(root: str, head: Head) -> List[str]:
    """What a plain (fetched, decrypted) copy at `root` lacks against its own head record:
    a generation, a snapshot, a segment, or bytes of the newest segment. Empty when it holds
    at least that (it may hold more: data shipped after the record was written)."""
    out: List[str] = []
    for name, g in sorted(head.generations.items()):
        path = os.path.join(root, name)
        if not os.path.isdir(path):
            out.append(f"{name} is missing")
            continue
        files = os.listdir(path)
        segs = sorted(f for f in files if is_segment_name(f))
        if g["snapshot"] and not any(is_snapshot_name(f) for f in files):
            out.append(f"{name} has lost its snapshot")
        if len(segs) < g["segments"]:
            missing = [segment_filename(i) for i in range(1, g["segments"] + 1) if segment_filename(i) not in segs]
            out.append(f"{name} lacks {', '.join(missing)} (it had {g['segments']} segment(s))")
        gid = _generation_id(os.path.join(path, segment_filename(1)))
        if gid is not None and gid != bytes.fromhex(g["id"]):
            out.append(f"{name} is not the generation the record names (generation id {gid.hex()}, not {g['id']})")
    seg = os.path.join(root, head.generation, head.segment)
    newer = os.path.isdir(os.path.join(root, head.generation)) and any(
        f > head.segment for f in os.listdir(os.path.join(root, head.generation)) if is_segment_name(f)
    )
    if os.path.exists(seg) and not newer:
        w = walk_segment(Walk(seg), os.path.getsize(seg))
        if w.offset < head.segment_length:
            out.append(
                f"{head.generation}/{head.segment} holds {w.offset} bytes of journal where the record says "
                f"{head.segment_length} (data_version {w.data_version} where it says {head.data_version})"
            )
    return out


def _generation_id(path: str) -> Optional[bytes]:
    try:
        with open(path, "rb") as f:
            data = f.read(HEADER_SIZE)
    except OSError:
        return None
    return data[16:32] if len(data) == HEADER_SIZE else None


def describe_time(t: Optional[float]) -> str:
    return "unknown" if t is None else time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(t))


class HeadMaker:
    """The shipper's side: a head record for what a round has just sent, staged only when
    it says something new (a round with nothing new costs no extra login)."""

    def __init__(self, destination: str, staging: str, key: Optional[Key]):
        self.destination = destination
        self.staging = staging
        self.key = key
        self.copy_id = copy_id(staging)
        self._node_ids: Dict[str, bytes] = {}
        self._walk: Optional[Walk] = None
        self.last_sent: Optional[Head] = None
        self.newest_mtime: Optional[float] = None  # set by the shipper's listing, before the open segment's length
        self.sender: Optional[str] = None  # a synchronous copy's sender state, recorded in its head records

    def binding(self, gen: Optional[dst.Generation]) -> Binding:
        return Binding(self.copy_id, self.node_id(gen))

    def node_id(self, gen: Optional[dst.Generation]) -> bytes:
        if gen is None:
            return NO_NODE_ID
        known = self._node_ids.get(gen.name)
        if known is None:
            found = node_id_of(gen)
            if found is None:
                return NO_NODE_ID  # looked for again next time: a fresh node writes it soon
            known = self._node_ids[gen.name] = found
        return known

    def make(self, gens: List[dst.Generation], lengths: Dict[str, int], generation_ids: Dict[str, str]) -> Optional[Head]:
        """The record for the generations `gens` as sent (`lengths`: bytes of each file in
        the copy); None when there is nothing to record or it says nothing new."""
        gens = [g for g in gens if g.segments and all(self._rel(p) in lengths for p in g.segments + g.snapshots)]
        if not gens:
            return None
        newest = gens[-1]
        seg = newest.segments[-1]
        rel = self._rel(seg)
        if self._walk is None or self._walk.path != seg:
            self._walk = Walk(seg)
        walk = walk_segment(self._walk, lengths[rel])
        head = Head(
            copy_id=self.copy_id,
            node_id=self.node_id(newest),
            generation=newest.name,
            segment=os.path.basename(seg),
            segment_length=walk.offset,
            data_version=walk.data_version,
            newest_write=self.newest_mtime,
            written=time.time(),
            generations={
                g.name: {"id": generation_ids.get(g.name, ""), "segments": len(g.segments), "snapshot": g.snapshot is not None}
                for g in gens
            },
            sender=self.sender,
        )
        if any(not v["id"] for v in head.generations.values()):
            return None  # a generation whose first header could not be read: verify's business
        return None if head.same_content(self.last_sent) else head

    def _rel(self, path: str) -> str:
        return os.path.relpath(path, self.destination)

    def stage(self, head: Head) -> None:
        with open(os.path.join(self.staging, HEAD), "wb") as f:
            f.write(seal_head(head, self.key))
