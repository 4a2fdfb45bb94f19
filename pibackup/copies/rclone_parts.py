"""How a file that only grows is kept in a store that cannot append (FORMAT.md, "Copies in
object storage"): a base object, then part objects named by the offset they continue at.

A file's base object has the file's own name; each part holds the bytes that follow its
offset and is named `NAME.part-TAG-OFFSET`, TAG being the first 8 hex digits of the SHA-256
of the base's first 128 bytes. A reader takes the base, then the part at the base's length,
then the part at the end of that one, and so on: parts off that chain, or of another base
(another TAG), are leftovers of an interrupted round and are never joined.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import BinaryIO, Dict, Iterable, List, Optional, Tuple

from pibackup.store.layout import HEAD, is_layout_path

TAG_BYTES = 128
_PART = re.compile(r"^(?P<base>.+)\.part-(?P<tag>[0-9a-f]{8})-(?P<offset>[0-9]{12})$")
COPY_BLOCK = 1 << 16


def tag_of(prefix: bytes) -> str:
    """The TAG of a base that starts with `prefix` (at least its first TAG_BYTES bytes)."""
    return hashlib.sha256(prefix[:TAG_BYTES]).hexdigest()[:8]


def file_tag(path: str, length: int = TAG_BYTES) -> str:
    """The TAG of a base that is the first `length` bytes of the file at `path`."""
    with open(path, "rb") as f:
        return tag_of(f.read(min(length, TAG_BYTES)))


def part_name(rel: str, tag: str, offset: int) -> str:
    return f"{rel}.part-{tag}-{offset:012d}"


def parse_part(name: str) -> Optional[Tuple[str, str, int]]:
    """(the file's name, TAG, offset) of a part object's name; None for any other name."""
    m = _PART.match(name)
    if not m:
        return None
    return m.group("base"), m.group("tag"), int(m.group("offset"))


@dataclass
class Stored:
    """What the store holds for one file of the backup's layout."""

    rel: str
    base: Optional[int] = None  # the base object's size; None when there is none
    parts: Dict[str, Dict[int, int]] = field(default_factory=dict)  # TAG -> offset -> size

    def chain(self, tag: str) -> List[Tuple[int, int]]:
        """(offset, size) of the parts a reader joins to a base of this TAG, in order."""
        if self.base is None:
            return []
        out: List[Tuple[int, int]] = []
        offsets = self.parts.get(tag, {})
        at = self.base
        while at in offsets and offsets[at] > 0:
            out.append((at, offsets[at]))
            at += offsets[at]
        return out

    def length(self, tag: str) -> int:
        """The file's length in the store as a reader joins it."""
        chain = self.chain(tag)
        return chain[-1][0] + chain[-1][1] if chain else (self.base or 0)

    def part_names(self) -> List[str]:
        return [part_name(self.rel, t, o) for t, offs in sorted(self.parts.items()) for o in sorted(offs)]

    def objects(self) -> List[Tuple[str, int]]:
        """Every object of this file with its size: the base, then the parts."""
        out = [(self.rel, self.base)] if self.base is not None else []
        out += [(part_name(self.rel, t, o), s) for t, offs in sorted(self.parts.items()) for o, s in sorted(offs.items())]
        return out


def group(objects: Iterable[Tuple[str, int]]) -> Dict[str, Stored]:
    """The layout's files and the head record among a store's objects (name, size), with
    their parts. Any other object is left out: a reader never takes it."""
    out: Dict[str, Stored] = {}
    for name, size in objects:
        part = parse_part(name)
        if part is not None:
            rel, tag, offset = part
            if is_layout_path(rel):
                out.setdefault(rel, Stored(rel)).parts.setdefault(tag, {})[offset] = size
        elif is_layout_path(name) or name == HEAD:
            out.setdefault(name, Stored(name)).base = size
    return out


def join(stored: Stored, objects_dir: str, out_path: str) -> None:
    """Make the file at out_path from its base and chain of parts fetched into objects_dir
    (each under its object name). The base is moved, parts appended; a part that did not
    arrive ends the file there (the reader then sees it as cut short)."""
    base = os.path.join(objects_dir, stored.rel)
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    os.replace(base, out_path)
    with open(out_path, "rb") as f:
        tag = tag_of(f.read(TAG_BYTES))
    with open(out_path, "ab") as out:
        for offset, size in stored.chain(tag):
            part = os.path.join(objects_dir, part_name(stored.rel, tag, offset))
            try:
                src = open(part, "rb")
            except FileNotFoundError:
                return
            with src:
                if os.fstat(src.fileno()).st_size != size or out.tell() != offset:
                    return  # changed since it was listed: what came before stands
                _copy(src, out)


def _copy(src: BinaryIO, out: BinaryIO) -> None:
    while True:
        block = src.read(COPY_BLOCK)
        if not block:
            return
        out.write(block)
