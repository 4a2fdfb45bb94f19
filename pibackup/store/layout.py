"""Every name pibackup gives a file or directory in a backup directory, in one place.

docs/FORMAT.md's "Directory tree" is the specification; a second reader relies on these names.
"""

from __future__ import annotations

import os
import re
from typing import FrozenSet, List, Optional, Tuple

# --- the top of a backup directory -------------------------------------------------
MARKER = "PIBACKUP"  # the marker file: this directory is a pibackup backup
TMP_SUFFIX = ".tmp"  # a file being written durably (PATH.tmp, synced, renamed): readers ignore it
MARKER_TMP = MARKER + TMP_SUFFIX  # left by a first start that crashed midway
# The writer's lock is an flock on a 0700 directory of its own, which no other user can
# open: a lock on a file any local user can open (the marker, as earlier releases had it)
# let any of them hold it and halt the node. The directory itself, not a file in it: one
# inode, and nothing in it for copies and checks to meet.
LOCK_DIR = "PIBACKUP.lock"
# Whose backup this is (text: node id and network, store/identity.py); written once the
# node id is known, before that a brand-new node's backup has none.
NODE_FILE = "NODE"
# lightningd's static channel backup (its network directory's file), copied whole whenever
# lightningd rewrites it (EMERGENCY_RECOVER.tmp, synced, renamed).
EMERGENCY_RECOVER = "emergency.recover"
TOP_FILES = (NODE_FILE, EMERGENCY_RECOVER)  # the node's files beside the marker, shipped with it
# What file systems put at the root of a stick; harmless next to a backup.
FS_ARTIFACTS: FrozenSet[str] = frozenset({"lost+found", "System Volume Information", ".Trashes", ".fseventsd", ".Spotlight-V100"})

# --- generations (journal mode) ----------------------------------------------------
GENERATION_PREFIX = "gen-"
PARTIAL_SUFFIX = ".partial"  # being built: never read, removed at the next start
DELETED_SUFFIX = ".deleted"  # retention was deleting it: never read, removed at the next start
GENERATION_RE = re.compile(r"^gen-(\d{6})$")
PARTIAL_GENERATION_RE = re.compile(r"^gen-(\d{6})\.partial$")
DELETED_GENERATION_RE = re.compile(r"^gen-(\d{6})\.deleted$")
SEGMENT_RE = re.compile(r"^seg-(\d{6})\.pbj$")
# A compressed snapshot (store/snapfile.py) since format 2; format 1 wrote plain SQLite files.
SNAPSHOT_RE = re.compile(r"^snapshot-v(\d+)\.(?:pbsnap|sqlite3)$")
SNAPSHOT_TMP = "snapshot.tmp"  # a snapshot being taken, inside a `.partial` generation
DAMAGE_MARK = "DAMAGED"  # in a generation directory: a writer found it damaged

# --- replicas (replica mode) -------------------------------------------------------
REPLICA_PREFIX = "replica-"
REPLICA_FILE = "replica.sqlite3"
DAMAGED_SUFFIX = ".damaged"  # a replica that could not be read, set aside (never deleted)
REPLICA_DIR_RE = re.compile(r"^replica-(\d{6})$")
REPLICA_LEFTOVER_RE = re.compile(r"^replica-(\d{6})\.(partial|deleted)$")
REPLICA_ANY_RE = re.compile(r"^replica-(\d{6})(\..*)?$")  # complete, partial, deleted or set aside as damaged

# --- shipping (not part of the backup, never shipped) ------------------------------
STAGING_DIR = ".ship"  # DEST/.ship: the shipper's state, copy id, head record and staging copies
STATE_FILE = "state.json"  # in STAGING_DIR: what the remote copy holds
COPY_ID_FILE = "copy-id"  # in STAGING_DIR: made once per backup directory
HEAD = "HEAD"  # the head record: at the top of a copy, beside PIBACKUP (staged in STAGING_DIR)

# --- outside a backup directory ----------------------------------------------------
RESTORE_TMP_SUFFIX = ".pibackup-tmp"  # restore writes OUTPUT.pibackup-tmp, syncs it, renames it


def generation_dirname(number: int) -> str:
    return f"gen-{number:06d}"


def segment_filename(number: int) -> str:
    return f"seg-{number:06d}.pbj"


def snapshot_filename(version: int) -> str:
    """The name a writer gives a snapshot: compressed (format 2)."""
    return f"snapshot-v{version}.pbsnap"


def plain_snapshot_filename(version: int) -> str:
    """A format 1 snapshot's name: a plain SQLite file, still read."""
    return f"snapshot-v{version}.sqlite3"


def snapshot_version(name: str) -> Optional[int]:
    """The base data_version a snapshot's file name carries; None for any other name."""
    m = SNAPSHOT_RE.match(os.path.basename(name))
    return int(m.group(1)) if m else None


def replica_dirname(number: int) -> str:
    return f"replica-{number:06d}"


def generation_number(name: str) -> Optional[int]:
    """N of a complete generation's directory name gen-NNNNNN; None for any other name."""
    m = GENERATION_RE.match(name)
    return int(m.group(1)) if m else None


def is_generation_name(name: str) -> bool:
    return bool(GENERATION_RE.match(name))


def is_segment_name(name: str) -> bool:
    return bool(SEGMENT_RE.match(name))


def is_snapshot_name(name: str) -> bool:
    return bool(SNAPSHOT_RE.match(name))


def is_layout_path(rel: str) -> bool:
    """PIBACKUP, NODE, emergency.recover, or gen-NNNNNN/seg-NNNNNN.pbj, or
    gen-NNNNNN/snapshot-vN.sqlite3: the files of a backup a copy holds, and nothing that could
    name a file outside a generation ("..", "*", a slash too many). HEAD, a copy's head
    record, is not one: it is checked apart."""
    if rel == MARKER or rel in TOP_FILES:
        return True
    parts = rel.split("/")
    return len(parts) == 2 and is_generation_name(parts[0]) and (is_segment_name(parts[1]) or is_snapshot_name(parts[1]))


def replica_dirs(path: str) -> List[Tuple[int, str]]:
    """Complete replica directories (those holding their replica file), oldest first."""
    out = []
    for name in sorted(os.listdir(path)):
        m = REPLICA_DIR_RE.match(name)
        if m and os.path.exists(os.path.join(path, name, REPLICA_FILE)):
            out.append((int(m.group(1)), os.path.join(path, name)))
    return out


def holds_replica(path: str) -> bool:
    """Does `path` hold a replica-mode backup (a replica-NNNNNN directory)? False when unreadable."""
    try:
        return any(REPLICA_DIR_RE.match(n) for n in os.listdir(path))
    except OSError:
        return False


def holds_journal(path: str) -> bool:
    """Does `path` hold anything of a journal-mode backup (a gen-* name, even a `.partial`)?
    False when unreadable."""
    try:
        return any(n.startswith(GENERATION_PREFIX) for n in os.listdir(path))
    except OSError:
        return False
