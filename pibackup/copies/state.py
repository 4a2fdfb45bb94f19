"""The shipper's saved state (DEST/.ship/state.json), read back only when every name in
it is one of the backup layout's: names from it reach file deletions, locally and remotely.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Tuple

from pibackup.store.layout import TMP_SUFFIX, is_generation_name, is_layout_path

STATE_VERSION = 1  # fields added since are optional: an older release's state still loads
_HEX16 = re.compile(r"^[0-9a-f]{32}$")
_HEX33 = re.compile(r"^[0-9a-f]{66}$")
_MAX_INT = 1 << 62


@dataclass
class FileState:
    staged: int = 0  # bytes of the local file taken into the staging copy (or sent directly)
    staged_size: int = 0  # the staging copy's length
    file_id: str = ""  # encrypted copies: hex file id
    next_index: int = 0  # encrypted copies: the next chunk's index
    sent: bool = False  # the remote holds some of this staging copy: append to it
    unsent: bool = False  # the staging copy grew since the last successful round
    final: bool = False  # the local file is closed and fully staged
    done: bool = False  # final and sent: never looked at again
    node_id: str = ""  # encrypted copies: hex node id in the file's header (its later chunks need the same)


class BadState(ValueError):
    pass


def _file_state(rel: str, raw: Any) -> FileState:
    if not is_layout_path(rel):
        raise BadState(f"{rel!r} is not a file of the backup's layout")
    if not isinstance(raw, dict):
        raise BadState(f"the entry of {rel} is not an object")
    known = {f.name: f.type for f in fields(FileState)}
    values: Dict[str, Any] = {}
    for name, value in raw.items():
        if name not in known:
            raise BadState(f"the entry of {rel} has an unknown field {name!r}")
        kind = known[name]
        if kind == "int":
            ok = type(value) is int and 0 <= value < _MAX_INT
        elif kind == "bool":
            ok = type(value) is bool
        elif name == "file_id":
            ok = isinstance(value, str) and (value == "" or bool(_HEX16.match(value)))
        else:  # node_id
            ok = isinstance(value, str) and (value == "" or bool(_HEX33.match(value)))
        if not ok:
            raise BadState(f"the entry of {rel} has a bad {name}: {value!r}")
        values[name] = value
    return FileState(**values)


def load_state(path: str, identity: Dict[str, Any]) -> Tuple[Dict[str, FileState], Dict[str, str], bool]:
    """(files, generation ids, remote checked) from state.json. FileNotFoundError when there
    is none; BadState (a ValueError) when it is not for this target and key, or anything in
    it is not what a shipper writes."""
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadState(f"not JSON: {e}") from e
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        raise BadState("an unknown version")
    if {k: data.get(k) for k in identity} != identity:
        raise BadState("another target or key")
    files_raw = data.get("files")
    ids_raw = data.get("generation_ids", {})
    if not isinstance(files_raw, dict) or not isinstance(ids_raw, dict):
        raise BadState("files or generation_ids is not an object")
    files = {rel: _file_state(rel, v) for rel, v in files_raw.items()}
    for name, gid in ids_raw.items():
        if not is_generation_name(name) or not isinstance(gid, str) or not _HEX16.match(gid):
            raise BadState(f"generation id entry {name!r}: {gid!r} is not a generation and its id")
    checked = data.get("remote_checked", False)
    if type(checked) is not bool:
        raise BadState("remote_checked is not true or false")
    return files, dict(ids_raw), checked


def save_state(
    path: str, identity: Dict[str, Any], files: Dict[str, FileState], generation_ids: Dict[str, str], checked: bool
) -> None:
    data = dict(identity, version=STATE_VERSION, remote_checked=checked, generation_ids=generation_ids)
    data["files"] = {rel: asdict(st) for rel, st in files.items()}
    with open(path + TMP_SUFFIX, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(path + TMP_SUFFIX, path)  # no sync: a lost update means some files are sent again


def inside(root: str, path: str) -> bool:
    """Is `path` root itself's child or deeper (no symlink or '..' leading out)? A last guard
    before a deletion under the staging directory."""
    r = os.path.realpath(root)
    p = os.path.realpath(path)
    return p != r and p.startswith(r + os.sep)
