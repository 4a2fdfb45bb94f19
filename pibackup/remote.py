"""Reading a shipped copy: fetch it from the remote host, decrypt it, then restore or verify
it like any backup directory.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Iterator, List, Optional, Tuple

from . import destination as dst
from .crypt import CryptError, Key, decrypt_file, is_encrypted
from .errors import PibackupError
from .journal import HEADER_SIZE, decode_header
from .ship import ShipError, explain_rsync_failure, parse_target, rsync_base

_GEN = re.compile(r"^gen-\d{6}$")
_FILE = re.compile(r"^(snapshot-v\d+\.sqlite3|seg-\d{6}\.pbj)$")


def is_remote(spec: str) -> bool:
    """host:/path or user@host:path, and not a local path that happens to hold a colon."""
    return ":" in spec and not spec.startswith(("/", ".", "~")) and not os.path.exists(spec)


def fetch(spec: str, into: str, port: int, identity: Optional[str], known_hosts: Optional[str]) -> None:
    target = parse_target(spec, option="the remote copy")
    cmd = rsync_base(port, identity, known_hosts) + ["--recursive", "--exclude=.ship", f"{target}/", into + "/"]
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if r.returncode != 0:
        raise ShipError(f"cannot fetch {target}: " + explain_rsync_failure(r.returncode, r.stderr, target, port, known_hosts))


def _files(root: str) -> List[Tuple[str, str]]:
    """(relative path, path) of the marker and every generation's files, in order."""
    out: List[Tuple[str, str]] = []
    if not os.path.isdir(root):
        return out  # restore and verify say what is wrong with it
    marker = os.path.join(root, dst.MARKER)
    if os.path.exists(marker):
        out.append((dst.MARKER, marker))
    for g in sorted(n for n in os.listdir(root) if _GEN.match(n)):
        for f in sorted(os.listdir(os.path.join(root, g))):
            if _FILE.match(f):
                out.append((f"{g}/{f}", os.path.join(root, g, f)))
    return out


def encrypted_copy(root: str) -> bool:
    return any(is_encrypted(p) for rel, p in _files(root) if rel != dst.MARKER)


def decrypt_tree(src: str, out: str, key: Key) -> None:
    """Decrypt a copy made with pibackup-ship-encrypt-key into `out`. Every file must be
    encrypted with `key` and whole; only the newest segment may end unfinished (the
    writer was still appending to it when the copy was made)."""
    files = _files(src)
    segs = [rel for rel, _ in files if rel.endswith(".pbj")]
    newest_seg = segs[-1] if segs else None
    os.makedirs(out, exist_ok=True)
    for rel, path in files:
        target = os.path.join(out, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if rel == dst.MARKER:
            shutil.copyfile(path, target)
            continue
        if not is_encrypted(path):
            raise CryptError(
                f"{rel} is not encrypted, but this copy is: it was altered or mixed with another copy; do not use it"
            )
        with open(target, "wb") as f:
            d = decrypt_file(path, f, key, rel)
        if not d.final and rel != newest_seg:
            raise CryptError(
                f"{rel} is cut short (it ends before its final chunk): a shipping round was interrupted, or the copy "
                "was truncated or altered. If the plugin still runs, its next round completes it"
            )


@contextlib.contextmanager
def readable_copy(
    source: str,
    work_near: Optional[str],
    key_file: Optional[str],
    port: int = 22,
    identity: Optional[str] = None,
    known_hosts: Optional[str] = None,
) -> Iterator[str]:
    """A plain backup directory for `source` (a local directory or [user@]host:/path),
    fetched and decrypted into temporary directories that are removed afterwards."""
    key = None
    if key_file is not None:
        from .crypt import load_key

        key = load_key(key_file)
    with contextlib.ExitStack() as stack:
        base = os.path.dirname(os.path.abspath(work_near)) if work_near else None

        def workdir(suffix: str) -> str:
            d = tempfile.mkdtemp(prefix=f"pibackup-{suffix}-", dir=base)
            stack.callback(shutil.rmtree, d, True)
            return d

        root = source
        copied = False
        if is_remote(source):
            root = workdir("fetch")
            fetch(source, root, port, identity, known_hosts)
            copied = True
        if key is not None:
            plain = workdir("plain")
            decrypt_tree(root, plain, key)
            root = plain
            copied = True
        elif encrypted_copy(root):
            raise CryptError(f"{source} is an encrypted copy: give the key file with --key FILE")
        if copied:
            drop_unfinished_newest(root)
        yield root


def drop_unfinished_newest(root: str) -> None:
    """A shipped copy whose newest generation has no journal yet, or a journal without the
    snapshot its header names, was caught while that generation was being sent: use the one
    before it, and say so. (Locally a generation is never visible before it is complete.)
    Only ever done on our own temporary copy."""
    gens = dst.Destination(root).generations()
    if len(gens) < 2:
        return
    why = _unfinished(gens[-1])
    if why is None:
        return
    shutil.rmtree(gens[-1].path)
    print(f"pibackup: note: {gens[-1].name} of this copy was still being shipped ({why}); using {gens[-2].name}", file=sys.stderr)


def _unfinished(gen: dst.Generation) -> Optional[str]:
    first = os.path.join(gen.path, "seg-000001.pbj")
    if first not in gen.segments:
        return "no journal yet"
    if gen.snapshot is not None:
        return None
    try:
        with open(first, "rb") as f:
            header = decode_header(f.read(HEADER_SIZE), first)
    except (OSError, PibackupError):
        return None  # restore and verify say what is wrong with it
    return "no snapshot yet" if header.snapshot_sha256 != bytes(32) else None
