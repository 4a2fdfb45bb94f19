"""Reading a shipped copy: fetch it from the remote host, decrypt it, then restore or verify
it like any backup directory, with what its head record says about how current it is.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Tuple

from pibackup.copies.crypt import Binding, CryptError, Key, decrypt_file, file_header, is_encrypted
from pibackup.copies.fetch import FREE_RESERVE, MAX_FILE_DEFAULT, _free, _mib, fetch, is_remote
from pibackup.copies.head import Head, HeadError, describe_time, read_head, shortfalls
from pibackup.copies.target import ShipError
from pibackup.errors import PibackupError
from pibackup.store import directory as dst
from pibackup.store.layout import HEAD, MARKER, TOP_FILES, is_generation_name, is_layout_path, segment_filename
from pibackup.store.segment import HEADER_SIZE, decode_header

_WORKDIR = re.compile(r"^pibackup-(?:fetch|plain)-(\d+)-")


class Terminated(BaseException):
    """SIGTERM or SIGHUP: unwind like Ctrl-C, so every temporary copy is removed."""


def _files(root: str) -> List[Tuple[str, str]]:
    """(relative path, path) of the marker, NODE and emergency.recover, and every generation's
    files, in order."""
    out: List[Tuple[str, str]] = []
    if not os.path.isdir(root):
        return out  # restore and verify say what is wrong with it
    marker = os.path.join(root, MARKER)
    if os.path.exists(marker):
        out.append((MARKER, marker))
    out += [(name, os.path.join(root, name)) for name in TOP_FILES if os.path.isfile(os.path.join(root, name))]
    for g in sorted(n for n in os.listdir(root) if is_generation_name(n)):
        for f in sorted(os.listdir(os.path.join(root, g))):
            if is_layout_path(f"{g}/{f}"):
                out.append((f"{g}/{f}", os.path.join(root, g, f)))
    return out


def encrypted_copy(root: str) -> bool:
    return any(is_encrypted(p) for rel, p in _files(root) if rel != MARKER) or is_encrypted(os.path.join(root, HEAD))


@dataclass
class CopyReport:
    """What reading a copy found besides its backup: its head record, and notes."""

    root: str
    head: Optional[Head] = None
    notes: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)  # the copy is older than its own records say
    doubts: List[str] = field(default_factory=list)  # its head record is missing or unusable: no check possible
    newest: str = ""  # a line on when its newest transaction was written


def _expected(src: str, key: Key, report: CopyReport, bound: List[Tuple[str, Binding]]) -> Optional[Binding]:
    """The copy and node this copy's files must belong to: its head record's, or (without
    one) its newest bound file's."""
    head_path = os.path.join(src, HEAD)
    if os.path.exists(head_path):
        try:
            report.head = read_head(head_path, key)
            return report.head.binding
        except (HeadError, CryptError, OSError) as e:
            report.doubts.append(f"its head record cannot be used ({e}): whether it was rolled back cannot be told")
    elif bound:
        report.doubts.append(
            "it has no head record, though its files were shipped by a pibackup that writes one: it was removed "
            "(or the first round of that pibackup was cut short); whether it was rolled back cannot be told"
        )
    return bound[-1][1] if bound else None


def decrypt_tree(src: str, out: str, key: Key, report: Optional[CopyReport] = None) -> CopyReport:
    """Decrypt a copy made with pibackup-ship-encrypt-key into `out`. Every file must be
    encrypted with `key`, whole, and bound to this copy; only the newest segment may end
    unfinished (the writer was still appending to it when the copy was made)."""
    report = report or CopyReport(out)
    files = _files(src)
    segs = [rel for rel, _ in files if rel.endswith(".pbj")]
    newest_seg = segs[-1] if segs else None
    # Headers first: a copy mixed with another is refused before anything is decrypted.
    bound: List[Tuple[str, Binding]] = []
    unbound: List[str] = []
    for rel, path in files:
        if rel == MARKER:
            continue
        if not is_encrypted(path):
            raise CryptError(
                f"{rel} is not encrypted, but this copy is: it was altered or mixed with another copy; do not use it"
            )
        h = file_header(path, key)
        if h.binding is None:
            unbound.append(rel)
        else:
            bound.append((rel, h.binding))
    expected = _expected(src, key, report, bound)
    whose = "its head record" if report.head is not None else "its newest file"
    for rel, b in bound:
        if expected is not None and not b.agrees(expected):
            raise CryptError(
                f"{rel} belongs to {b.describe()}, but this copy is {expected.describe()} ({whose} says so): files of "
                "another copy were mixed in under the same key. Do not use this copy as it is: restore from the backup "
                "medium or another copy, or remove the files of the other copy"
            )
    if unbound:
        shown = ", ".join(unbound[:3]) + (", ..." if len(unbound) > 3 else "")
        report.notes.append(
            f"{len(unbound)} file(s) of this copy are not bound to a copy ({shown}): they were encrypted by an older "
            "pibackup, so a host could have swapped them for another copy's under the same key unnoticed"
        )
    total = sum(os.path.getsize(p) for _, p in files)
    os.makedirs(out, exist_ok=True)
    if total > _free(out) - FREE_RESERVE:
        raise ShipError(f"decrypting this copy needs about {_mib(total)}; {out} has {_mib(_free(out))} free")
    first_in_generation = next((rel for rel, _ in files if "/" in rel), None)
    for rel, path in files:
        target = os.path.join(out, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if rel == MARKER:
            shutil.copyfile(path, target)
            continue
        with open(target, "wb") as f:
            d = decrypt_file(path, f, key, rel)
        if not d.final and rel != newest_seg:
            raise CryptError(
                f"{rel} is cut short (it ends before its final chunk): a shipping round was interrupted, or the copy "
                "was truncated or altered. If the plugin still runs, its next round completes it"
            )
        if rel == first_in_generation and os.environ.get("PIBACKUP_TEST_STOP_IN_DECRYPT"):
            os.kill(os.getpid(), signal.SIGSTOP)  # tests only: a decryption caught halfway
    return report


def private_workdir_base() -> str:
    """Where verify and status decrypt: ~/.cache/pibackup (XDG_CACHE_HOME), mode 700. Not
    /tmp: often a tmpfs (RAM, too small on a Pi for a copy) shared by every user, where
    plaintext left by a killed run would stay until the next boot. Here it is the user's
    own, on disk, and the next run removes what a killed one left. The current directory
    when there is no usable home."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    base = os.path.join(cache, "pibackup")
    try:
        os.makedirs(base, mode=0o700, exist_ok=True)
        if os.stat(base).st_uid == os.geteuid():
            os.chmod(base, 0o700)
            return base
    except OSError:
        pass
    return os.getcwd()


def remove_stale_workdirs(base: str) -> None:
    """Temporary copies left by a run that was killed (SIGKILL, power cut): their process is gone."""
    try:
        names = os.listdir(base)
    except OSError:
        return
    for name in names:
        m = _WORKDIR.match(name)
        path = os.path.join(base, name)
        if not m or int(m.group(1)) == os.getpid() or os.path.islink(path) or not os.path.isdir(path):
            continue
        try:
            if os.stat(path).st_uid != os.geteuid():
                continue
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue


@contextlib.contextmanager
def readable_copy(
    source: str,
    work_near: Optional[str],
    key_file: Optional[str],
    port: int = 22,
    identity: Optional[str] = None,
    known_hosts: Optional[str] = None,
    max_file: int = MAX_FILE_DEFAULT,
    rclone_config: Optional[str] = None,
) -> Iterator[CopyReport]:
    """A plain backup directory for `source` (a local directory, [user@]host:/path or rclone:REMOTE:path),
    fetched and decrypted into temporary directories (mode 700, next to `work_near`, else
    private_workdir_base()) that are removed afterwards, on any exit the process sees."""
    key = None
    if key_file is not None:
        from pibackup.copies.crypt import load_key

        key = load_key(key_file)
    with contextlib.ExitStack() as stack:
        base = os.path.dirname(os.path.abspath(work_near)) if work_near else private_workdir_base()
        remove_stale_workdirs(base)

        def workdir(suffix: str) -> str:
            d = tempfile.mkdtemp(prefix=f"pibackup-{suffix}-{os.getpid()}-", dir=base)  # mode 700
            stack.callback(shutil.rmtree, d, True)
            return d

        report = CopyReport(source)
        root = source
        copied = False
        if is_remote(source):
            root = workdir("fetch")
            fetch(source, root, port, identity, known_hosts, max_file, rclone_config)
            copied = True
        if key is not None:
            plain = workdir("plain")
            decrypt_tree(root, plain, key, report)
            root = plain
            copied = True
        elif encrypted_copy(root):
            raise CryptError(f"{source} is an encrypted copy: give the key file with --key FILE")
        elif os.path.exists(os.path.join(root, HEAD)):
            try:
                report.head = read_head(os.path.join(root, HEAD), None)
            except (HeadError, OSError) as e:
                report.doubts.append(f"its head record cannot be used ({e}): whether it was rolled back cannot be told")
        if copied:
            drop_unfinished_newest(root)
        report.root = root
        _compare_with_head(report, copied)
        yield report


def _compare_with_head(report: CopyReport, copied: bool) -> None:
    head = report.head
    if head is not None:
        missing = shortfalls(report.root, head)
        if missing:
            report.warnings.append("; ".join(missing))
        dv = "" if head.data_version is None else f" (data_version {head.data_version})"
        report.newest = (
            f"newest transaction of this copy written at {describe_time(head.newest_write)}{dv}, by its head record "
            f"of {describe_time(head.written)} ({Binding(head.copy_id, head.node_id).describe()})"
        )
        if head.sender is not None:  # a synchronous copy (pibackup-remote) says how its sender was
            report.newest += f"; the sending node was {head.sender} when last heard from, at {describe_time(head.written)}"
        return
    gens = dst.Destination(report.root).generations() if os.path.isdir(report.root) else []
    if copied or not gens or not gens[-1].segments:
        report.newest = "time of the newest transaction: unknown (no head record: shipped by an older pibackup, or not a copy)"
        return
    t = max(os.path.getmtime(p) for p in gens[-1].segments)
    report.newest = f"newest transaction written at about {describe_time(t)} (the newest segment's last change)"


def older_than_records(report: CopyReport) -> Optional[str]:
    """The loud warning restore and verify print, or None."""
    if not report.warnings:
        return None
    return f"this copy is older than its own records say: {'; '.join(report.warnings)}"


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
    first = os.path.join(gen.path, segment_filename(1))
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
