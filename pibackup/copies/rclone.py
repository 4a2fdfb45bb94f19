"""The Transport over rclone, to any remote of the owner's rclone config (S3, B2, Drive,
Dropbox, WebDAV, SFTP, ...): every rclone command line is built here, as an argument list.

rclone runs only during a round, with flags that keep it small (rclone_target.py). A
growing file reaches a store that cannot append as a base object and part objects
(rclone_parts.py); a closed one is sent whole, once, and its parts are removed after.
Whole files are uploaded beside the copy and renamed into place, never overwritten where
they are. A round costs one `rclone rcat` per growing file, one `rclone copy` per batch of
closed files and one `rclone moveto` per file of it, and a copy and a moveto for the head
record.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from typing import IO, Callable, Dict, List, Optional, Sequence, Tuple, Union

from pibackup.copies.rclone_parts import Stored, file_tag, group, join, part_name
from pibackup.copies.rclone_target import explain_rclone_failure, rclone_base
from pibackup.copies.target import RcloneTarget, ShipError
from pibackup.copies.transport import RemoteEntry, run_while_room
from pibackup.store.layout import is_generation_name

MAX_PARTS = 1000  # a growing file with this many parts is sent whole again: restore joins fewer objects
OBJECTS_DIR = ".pibackup-objects"  # inside a fetch's directory: the objects as fetched, before joining
# In the store: whole files arrive here first and are then renamed into place (server-side),
# so that an upload cut short (the Pi died) never leaves a shortened copy of a complete
# object. Not a name of the backup's layout: readers never take anything from it.
INCOMING = ".pibackup-incoming"
_NOT_FOUND = 3  # rclone's exit code for a directory that does not exist


@dataclass
class Known:
    """What this transport knows the store holds of one growing file: the file's TAG, its
    length there, and every part object (also leftovers) to remove when it is sent whole."""

    tag: str
    length: int
    parts: List[str]
    count: int  # parts on the chain


class RcloneTransport:
    """rclone to `target`. Calls run one at a time (the shipper's thread, or a reader);
    `stopping` set or cancel() makes the next call raise ShipError("stopping")."""

    def __init__(
        self,
        target: RcloneTarget,
        config: Optional[str],
        scratch: Optional[str] = None,  # not used: rclone deletes without an empty directory
        stopping: Optional[threading.Event] = None,
    ):
        self.target = target
        self.config = config
        self._stopping = stopping or threading.Event()
        self._proc: Optional[subprocess.Popen] = None
        self._proc_lock = threading.Lock()
        self._known: Dict[str, Known] = {}

    def describe(self) -> str:
        return str(self.target)

    def _where(self, rel: str = "") -> str:
        return f"{self.target.root}/{rel}" if rel else self.target.root

    def _failure(self, code: int, err: str) -> ShipError:
        return ShipError(explain_rclone_failure(code, err, self.target, self.config))

    def _run_bytes(self, args: Sequence[str], stdin: Union[bytes, IO[bytes], None] = None) -> Tuple[int, bytes, str]:
        """rclone with `args` after the common flags: (exit code, stdout, stderr)."""
        with self._proc_lock:
            if self._stopping.is_set():
                raise ShipError("stopping")
            try:
                self._proc = subprocess.Popen(
                    rclone_base(self.config) + list(args),
                    stdin=subprocess.PIPE if isinstance(stdin, bytes) else stdin if stdin is not None else subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    start_new_session=True,  # a Ctrl-C for lightningd is not one for rclone
                )
            except FileNotFoundError as e:
                raise ShipError(f"rclone is not installed (or not on lightningd's PATH): apt install rclone ({self.target})") from e
        proc = self._proc
        try:
            out, err = proc.communicate(stdin if isinstance(stdin, bytes) else None)
        finally:
            with self._proc_lock:
                self._proc = None
        return proc.returncode, out, err.decode(errors="replace")

    def _run(self, args: Sequence[str], stdin: Union[bytes, IO[bytes], None] = None) -> Tuple[int, str, str]:
        code, out, err = self._run_bytes(args, stdin)
        return code, out.decode(errors="replace"), err

    def cancel(self) -> None:
        with self._proc_lock:
            self._stopping.set()
            if self._proc is not None and self._proc.poll() is None:
                self._proc.terminate()

    # --- listing ------------------------------------------------------------------------
    def _lsjson(self, rel: str, recursive: bool) -> Optional[List[Dict]]:
        args = ["lsjson", "--no-mimetype", "--no-modtime"] + (["--recursive", "--files-only"] if recursive else [])
        code, out, err = self._run(args + [self._where(rel)])
        if code == _NOT_FOUND and "directory not found" in err.lower():
            return None
        if code != 0:
            raise self._failure(code, err)
        try:
            listed = json.loads(out or "[]")
        except ValueError as e:
            raise ShipError(f"rclone listed {self._where(rel)} in a form pibackup cannot read ({e}); is rclone recent enough?") from e
        return [e for e in listed if isinstance(e, dict) and isinstance(e.get("Path"), str)]

    def _stored(self) -> Dict[str, Stored]:
        listed = self._lsjson("", recursive=True) or []
        return group((e["Path"], int(e.get("Size") or 0)) for e in listed if not e.get("IsDir"))

    def list(self, recursive: bool = False) -> Optional[List[RemoteEntry]]:
        if recursive:
            # What a reader gets: each layout file at its length once joined (at most).
            stored = self._stored()
            return [RemoteEntry(rel, sum(s for _, s in st.objects()), True) for rel, st in sorted(stored.items())]
        listed = self._lsjson("", recursive=False)
        if listed is None:
            return None
        listed = [e for e in listed if e["Path"] != INCOMING]  # this transport's own, not the copy's
        out = {e["Path"]: RemoteEntry(e["Path"], max(0, int(e.get("Size") or 0)), not e.get("IsDir")) for e in listed}
        return [out[n] for n in sorted(out)]

    def _learn(self, rel: str, local: str) -> Optional[Known]:
        """What the store holds of `rel` (one listing of its directory); None without a base."""
        directory, _, name = rel.rpartition("/")
        listed = self._lsjson(directory, recursive=False) or []
        prefix = f"{directory}/" if directory else ""
        stored = group((prefix + e["Path"], int(e.get("Size") or 0)) for e in listed if not e.get("IsDir")).get(rel)
        if stored is None or stored.base is None:
            return None if stored is None else Known("", 0, stored.part_names(), 0)
        tag = file_tag(local, stored.base)  # the base is a prefix of the local file
        return Known(tag, stored.length(tag), stored.part_names(), len(stored.chain(tag)))

    # --- sending ------------------------------------------------------------------------
    def send(self, root: str, rels: Sequence[str], append: bool, growing: bool = False) -> None:
        if not growing:
            self._send_whole(root, list(rels))
            return
        for rel in rels:
            self._send_growing(root, rel, append)

    def _send_whole(self, root: str, rels: List[str], stale: Optional[List[str]] = None) -> None:
        """Each file whole, under its own name, replacing what was there; then the parts it
        had while it grew are removed (`stale`; None: those known, or found by a listing)."""
        if stale is None:
            known = [self._known.pop(rel, None) for rel in rels]
            stale = [p for k in known if k is not None for p in k.parts]
            unknown = [rel for rel, k in zip(rels, known, strict=True) if k is None and rel.endswith(".pbj")]
        else:
            unknown = []
        # In name order, one at a time: a call cut short leaves no newer file after a missing older one.
        flags = ["--files-from-raw=-", "--no-check-dest", "--no-traverse", "--order-by=name,ascending", "--check-first"]
        names = "".join(f"{r}\n" for r in rels).encode()
        code, _, err = self._run(["copy", *flags, root, self._where(INCOMING)], stdin=names)
        if code != 0:
            raise self._failure(code, err)
        for rel in sorted(rels):  # one at a time: rclone moves nothing into a directory it moves from
            code, _, err = self._run(["moveto", self._where(f"{INCOMING}/{rel}"), self._where(rel)])
            if code != 0:
                raise self._failure(code, err)
        self._delete_objects(stale + self._leftover_parts(unknown))

    def _leftover_parts(self, rels: List[str]) -> List[str]:
        """Parts of segments this transport did not see grow (it started since): one listing
        per directory."""
        out: List[str] = []
        for directory in sorted({r.rpartition("/")[0] for r in rels if "/" in r}):
            listed = self._lsjson(directory, recursive=False) or []
            names = group((f"{directory}/{e['Path']}", int(e.get("Size") or 0)) for e in listed if not e.get("IsDir"))
            out += [p for rel in rels if rel in names for p in names[rel].part_names()]
        return out

    def _send_growing(self, root: str, rel: str, append: bool) -> None:
        local = os.path.join(root, rel)
        size = os.path.getsize(local)
        known = self._known.pop(rel, None)  # unknown until this call succeeds: a failed one is listed again
        if known is None:
            known = self._learn(rel, local)
        if not append or known is None or not known.tag or known.length > size or known.count >= MAX_PARTS:
            # Sent whole as its base: the first time, under a new encryption (append=False),
            # or to fold many parts into one object; every part it had is removed after.
            self._send_whole(root, [rel], stale=known.parts if known is not None else [])
            self._known[rel] = Known(file_tag(local, size), size, [], 0)
            return
        if known.length < size:
            name = part_name(rel, known.tag, known.length)
            with open(local, "rb") as f:
                f.seek(known.length)
                code, _, err = self._run(["rcat", f"--size={size - known.length}", self._where(name)], stdin=f)
            if code != 0:
                raise self._failure(code, err)
            known = Known(known.tag, size, known.parts + [name], known.count + 1)
        self._known[rel] = known

    def _delete_objects(self, names: List[str]) -> None:
        if not names:
            return
        code, _, err = self._run(["delete", "--files-from-raw=-", self._where()], stdin="".join(f"{n}\n" for n in names).encode())
        if code != 0:
            raise self._failure(code, err)

    def delete(self, generations: Sequence[str]) -> None:
        names = [g for g in generations if is_generation_name(g)]  # the caller checked them; they reach a filter
        if not names:
            return
        code, _, err = self._run(["delete", "--rmdirs", *[f"--include=/{g}/**" for g in names], self._where()])
        if code != 0:
            raise self._failure(code, err)
        for rel in [r for r in self._known if r.split("/")[0] in names]:
            del self._known[rel]

    # --- fetching -----------------------------------------------------------------------
    def fetch(self, rel: str, into: str, max_bytes: int) -> bool:
        try:  # `cat --count`: never more than the cap reaches this side
            code, out, _ = self._run_bytes(["cat", f"--count={max_bytes + 1}", self._where(rel)])
        except ShipError:
            return False
        if code != 0 or len(out) > max_bytes:
            return False
        path = os.path.join(into, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(out)
        return True

    def fetch_copy(self, into: str, max_file: int, still_room: Callable[[], bool]) -> bool:
        stored = self._stored()
        objects = [name for st in stored.values() if st.base is not None for name, _ in st.objects()]
        scratch = os.path.join(into, OBJECTS_DIR)
        os.makedirs(scratch, mode=0o700, exist_ok=True)
        # (rclone takes no size filter with a list of names: fetch_from checked the listing's sizes)
        args = rclone_base(self.config) + ["copy", "--files-from-raw=-", "--no-traverse", self._where(), scratch]
        with tempfile.TemporaryFile() as names:
            names.write("".join(f"{n}\n" for n in sorted(objects)).encode())
            names.seek(0)
            try:
                done = run_while_room(args, still_room, stdin=names)
            except FileNotFoundError as e:
                raise ShipError("rclone is not installed (or not on this PATH): apt install rclone") from e
        if done is None or done[0] != 0:
            shutil.rmtree(scratch, ignore_errors=True)
            if done is None:
                return False
            raise self._failure(*done)
        try:
            for rel, st in sorted(stored.items()):
                if st.base is not None and os.path.isfile(os.path.join(scratch, rel)):
                    join(st, scratch, os.path.join(into, rel))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return True
