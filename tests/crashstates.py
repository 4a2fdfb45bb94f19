"""Crash-state exploration in the manner of ALICE and CrashMonkey.

1. Record: replay a real db_write recording through the real plugin (tests/driver.py),
   each plugin process under `strace -f`, which logs every file-system system call the
   process and its threads make (including SQLite's own, inside `take_snapshot`) with the
   full bytes written, and the plugin's answers on stdout. An answer `continue` to a
   db_write call is the moment that transaction is acknowledged; the answer to `init` is
   the moment the calls answered before init become the backup's (until then the live
   database is their only copy: hook.py).
2. Model: the recorded calls become a list of operations on inodes under the backup
   directory: data writes and truncations of a file, directory-entry changes (create,
   unlink, mkdir, rmdir, rename) and syncs, interleaved with the acknowledgements.
3. Crash states: at every point between two operations ("crash point"), the states the
   persistence model below allows.
4. Check: `restore.restore` on each state a reader can tell apart (the CLI on a sample;
   a new plugin carrying on from it on another), against lightningd's database rebuilt by
   applying the recording itself.

Persistence model (conservative POSIX, the "abstract persistence model" of ALICE with
arbitrary reordering of everything not yet synced):
- a write or truncation of a file is durable only once an fsync or fdatasync of that
  file (by any descriptor) has returned after it;
- a directory-entry change is durable only once an fsync of that directory has returned
  after it (an fsync of the file itself does not make its name durable);
- anything not yet durable may or may not have reached the medium, in any combination
  and order; a write may reach it in part: torn after any of several byte counts, at
  every page boundary, and with its pages reordered (a later page on the medium, an
  earlier one not); a write that extends the file may leave the new length with zeros
  where its bytes did not arrive;
- a rename within one directory is atomic (the new name shows the old or the new file,
  never neither); ext4, btrfs and xfs give that; FAT does not (see README, Reliability).

States explored per crash point: everything written so far, every prefix (in program
order) of the operations not yet durable, every single one of them left out, and torn and
page-reordered variants of the last write of each prefix. Three levels of "the same
state": the same set of operations applied (built once, checked against the strictest
crash point that produces it); the same tree except under `*.partial` and `*.tmp`, which
FORMAT.md has readers ignore (restored once, with those files in place, so the rule is
exercised rather than assumed); and the same bytes a reader depends on (ReaderKey:
replayed through SQLite once, the others share its database). The first and the last are
exact; `explore(full=True)` drops the last.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

import driver
from driver import Node, Record, is_pragma_only

SYSCALLS = (
    "open,openat,creat,write,pwrite64,writev,pwritev,pwritev2,fsync,fdatasync,sync_file_range,"
    "rename,renameat,renameat2,unlink,unlinkat,mkdir,mkdirat,rmdir,ftruncate,truncate,fallocate,"
    "close,lseek,dup,dup2,dup3,link,linkat,symlink,symlinkat,sync,syncfs,copy_file_range,sendfile"
)
PAGE = 4096
AT_FDCWD = -100
O_CREAT, O_TRUNC, O_APPEND, O_DIRECTORY = 0o100, 0o1000, 0o2000, 0o200000
AT_REMOVEDIR = 0x200


# --- 1. recording -------------------------------------------------------------------------


@dataclass
class Step:
    """One thing lightningd does in a scenario."""

    kind: str  # "start" (with `early` calls before init), "call", "stop", "without" (commit without the plugin)
    index: int = -1  # record index for "call" and "without"
    early: Tuple[int, ...] = ()


@dataclass
class Scenario:
    name: str
    records: List[Record]
    steps: List[Step]
    options: Dict[str, Any]


def sessions_of(
    records: Sequence[Record], restarts: Optional[Dict[int, int]] = None, without: Sequence[int] = (), start: int = 0
) -> List[Step]:
    """The steps of a replay from records[start] with lightningd's restarts where the
    recording has them, plus extra restarts at record index i with restarts[i] calls before
    init; `without` are record indexes lightningd commits while the plugin is not there (a gap)."""
    restarts = restarts or {}
    steps: List[Step] = []
    i, n = start, len(records)
    skip = set(without)
    while i < n:
        early: List[int] = []
        while i < n and i in skip:
            steps.append(Step("without", i))
            i += 1
        if i in restarts:
            early = [j for j in range(i, min(n, i + restarts[i]))]
            i += len(early)
        else:
            while i < n and records[i].pre_init and (not early or records[i].seq == records[early[-1]].seq + 1):
                early.append(i)
                i += 1
        steps.append(Step("start", early=tuple(early)))
        while i < n and not (records[i].pre_init and records[i].seq == 1) and i not in restarts and i not in skip:
            steps.append(Step("call", i))
            i += 1
        steps.append(Step("stop"))
    return steps


@dataclass
class Recording:
    scenario: Scenario
    dest: Path
    cwd: Path
    straces: List[Path]  # one per plugin process, in order
    ids: List[Dict[str, Tuple[str, Tuple[int, ...]]]]  # per process: request id -> ("call", (i,)) or ("init", early)
    final_db: Path
    seconds: float


def record(scenario: Scenario, root: Path) -> Recording:
    """Replay the scenario through the real plugin, each process under strace."""
    if shutil.which("strace") is None:
        raise RuntimeError("strace is needed (apt install strace)")
    root.mkdir(parents=True, exist_ok=True)
    dest = root / "usb" / "pibackup"
    dest.mkdir(parents=True)
    opts = {"pibackup-destination": str(dest)}
    opts.update(scenario.options)
    node = Node(root / "node", opts)
    straces: List[Path] = []
    ids: List[Dict[str, Tuple[str, Tuple[int, ...]]]] = []
    recs = scenario.records
    t0 = time.monotonic()
    try:
        for step in scenario.steps:
            if step.kind == "without":
                node.commit_without_plugin(recs[step.index])
            elif step.kind == "start":
                out = root / f"strace-{len(straces) + 1}.txt"
                straces.append(out)
                node.plugin_prefix = ["strace", "-f", "--seccomp-bpf", "-qq", "-xx", "-s", str(1 << 26), "-X", "raw"]
                node.plugin_prefix += ["-o", str(out), "-e", "trace=" + SYSCALLS]
                mine: Dict[str, Tuple[str, Tuple[int, ...]]] = {}
                ids.append(mine)
                node.start([], init=False)
                assert node.plugin is not None
                for i in step.early:
                    node.call(recs[i])
                    mine[f"cln:db_write#{node.plugin._counter}"] = ("call", (i,))
                node.init()
                mine[f"cln:init#{node.plugin._counter}"] = ("init", step.early)
            elif step.kind == "call":
                assert node.plugin is not None
                node.call(recs[step.index])
                mine[f"cln:db_write#{node.plugin._counter}"] = ("call", (step.index,))
            elif step.kind == "stop":
                node.stop()
        seconds = time.monotonic() - t0
        errors = [m for lvl, m in node.all_logs if lvl == "error"]
        assert not errors, errors
    finally:
        node.live.close()
    return Recording(scenario, dest, node.netdir, straces, ids, node.live.path, seconds)


# --- 2. the operations ---------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    kind: str  # "write", "trunc", "entry" (mutating); "sync", "ack", "ready" (not)
    ino: int = -1  # write, trunc, sync
    off: int = 0  # write: file offset; trunc: new size
    data: bytes = field(default=b"", repr=False)
    changes: Tuple[Tuple[int, str, Optional[int]], ...] = ()  # entry: (directory inode, name, inode or None), atomic
    records: Tuple[int, ...] = ()  # ack: acknowledged; ready: became the backup's; lightningd: committed without the plugin
    extends: bool = False  # write: it made the file longer
    what: str = ""

    @property
    def mutating(self) -> bool:
        return self.kind in ("write", "trunc", "entry")


ROOT = 0  # the inode of the backup directory itself


class ParseError(Exception):
    pass


_LINE = re.compile(r"^(\d+) +(.*)$")
_ARG = re.compile(r'"(?:\\x[0-9a-f]{2})*"(?:\.\.\.)?|\[[^\]]*\]|\{[^}]*\}|[^,]+')
_RESULT = re.compile(r"^(.*)\)\s+= (.*)$", re.S)
_HEX = re.compile(r'"((?:\\x[0-9a-f]{2})*)"(\.\.\.)?')


def _hex(s: str) -> bytes:
    m = _HEX.fullmatch(s.strip())
    if not m:
        raise ParseError(f"not a string: {s[:80]}")
    if m.group(2):
        raise ParseError("strace cut a string short (raise -s)")
    return bytes.fromhex(m.group(1).replace("\\x", ""))


def _calls(path: Path) -> Iterator[Tuple[str, List[str], str]]:
    """(syscall, arguments, result) in the order the calls returned; an unfinished call is
    joined with its resumption."""
    pending: Dict[str, Tuple[str, str]] = {}
    with open(path, encoding="ascii") as f:
        for line in f:
            m = _LINE.match(line.rstrip("\n"))
            if not m:
                raise ParseError(f"unexpected strace line: {line[:120]}")
            pid, rest = m.groups()
            if rest.startswith(("+++", "---")):
                continue
            if rest.startswith("<... "):
                name, _, tail = rest[5:].partition(" resumed>")
                pname, head = pending.pop(pid)
                assert pname == name, (pname, name)
                rest = f"{name}({head}{tail}"
            elif rest.endswith(" <unfinished ...>"):
                name, _, head = rest[: -len(" <unfinished ...>")].partition("(")
                pending[pid] = (name, head)
                continue
            name, _, body = rest.partition("(")
            m = _RESULT.match(body)
            if not m:
                raise ParseError(f"no result: {line[:120]}")
            yield name, [a.strip() for a in _ARG.findall(m.group(1))], m.group(2)


class Model:
    """Turns strace logs into operations on the inodes under the backup directory."""

    def __init__(self, dest: Path):
        self.dest = os.path.realpath(dest)
        self.ops: List[Op] = []
        self.dirs: Dict[int, Dict[str, int]] = {ROOT: {}}  # as the processes saw them
        self.parent: Dict[int, Tuple[int, str]] = {}
        self.is_dir: Dict[int, bool] = {ROOT: True}
        self.size: Dict[int, int] = {}
        self._next = 1

    # paths
    def _path_of(self, ino: int) -> str:
        parts = []
        while ino != ROOT:
            ino, name = self.parent[ino]
            parts.append(name)
        return os.path.join(self.dest, *reversed(parts))

    def _lookup(self, abspath: str) -> Optional[Tuple[int, str]]:
        """(directory inode, name) of a path under the backup directory; None outside it."""
        p = os.path.normpath(abspath)
        if p == self.dest or not p.startswith(self.dest + os.sep):
            return None
        parts = p[len(self.dest) + 1 :].split(os.sep)
        d = ROOT
        for name in parts[:-1]:
            nxt = self.dirs.get(d, {}).get(name)
            if nxt is None or not self.is_dir.get(nxt):
                raise ParseError(f"{p}: a directory on the way does not exist")
            d = nxt
        return d, parts[-1]

    def _new(self, directory: bool) -> int:
        ino = self._next
        self._next += 1
        self.is_dir[ino] = directory
        if directory:
            self.dirs[ino] = {}
        else:
            self.size[ino] = 0
        return ino

    def _entry(self, changes: Sequence[Tuple[int, str, Optional[int]]], what: str) -> None:
        for d, name, target in changes:
            if target is None:
                old = self.dirs[d].pop(name, None)
                if old is not None and self.parent.get(old) == (d, name):
                    del self.parent[old]
            else:
                self.dirs[d][name] = target
                if self.is_dir[target]:
                    self.parent[target] = (d, name)
        self.ops.append(Op("entry", changes=tuple(changes), what=what))

    def _write(self, ino: int, off: int, data: bytes, what: str) -> None:
        if not data:
            return
        extends = off + len(data) > self.size[ino]
        self.size[ino] = max(self.size[ino], off + len(data))
        self.ops.append(Op("write", ino, off, data, extends=extends, what=what))

    def add(self, op: Op) -> None:
        self.ops.append(op)

    # one process
    def process(self, strace: Path, cwd: Path, ids: Dict[str, Tuple[str, Tuple[int, ...]]]) -> None:
        fds: Dict[int, Dict[str, Any]] = {}  # fd -> {"ino": inode or None, "path": for outside ones, "pos": int, "append": bool}
        stdout = b""

        def base(dirfd: int) -> str:
            if dirfd == AT_FDCWD:
                return str(cwd)
            f = fds.get(dirfd)
            if f is None:
                raise ParseError(f"unknown directory descriptor {dirfd}")
            return self._path_of(f["ino"]) if f["ino"] is not None else f["path"]

        def resolve(dirfd: int, raw: str) -> Tuple[str, Optional[Tuple[int, str]]]:
            p = os.path.join(base(dirfd), _hex(raw).decode())
            return p, self._lookup(p)

        def fd_ino(fd: int) -> Optional[int]:
            f = fds.get(fd)
            if f is None:
                if fd > 2:
                    raise ParseError(f"a write or sync on descriptor {fd}, opened where strace did not see it")
                return None
            return f["ino"]

        for name, args, result in _calls(strace):
            try:
                ret = int(result.split()[0], 0)
            except ValueError:
                ret = -1  # "?": the process died in the call
            if ret < 0 and name not in ("close",):
                continue
            if name in ("open", "openat", "creat"):
                dirfd = int(args[0]) if name == "openat" else AT_FDCWD
                raw = args[1] if name == "openat" else args[0]
                flags = (O_CREAT | O_TRUNC | 1) if name == "creat" else int(args[2 if name == "openat" else 1], 0)
                path, where = resolve(dirfd, raw)
                if os.path.normpath(path) == self.dest:
                    fds[ret] = {"ino": ROOT, "path": path, "pos": 0, "append": False}
                    continue
                if where is None:
                    fds[ret] = {"ino": None, "path": path, "pos": 0, "append": False}
                    continue
                d, n = where
                ino = self.dirs[d].get(n) if n else d
                if ino is None:
                    if not flags & O_CREAT:
                        raise ParseError(f"{path} opened, but it was never created")
                    ino = self._new(bool(flags & O_DIRECTORY))
                    self._entry([(d, n, ino)], f"create {path}")
                elif flags & O_TRUNC and not self.is_dir[ino] and self.size[ino]:
                    self.size[ino] = 0
                    self.ops.append(Op("trunc", ino, 0, what=f"O_TRUNC {path}"))
                fds[ret] = {"ino": ino, "path": path, "pos": 0, "append": bool(flags & O_APPEND)}
            elif name == "close":
                fds.pop(int(args[0]), None)
            elif name in ("dup", "dup2", "dup3"):
                fds[ret] = dict(fds[int(args[0])]) if int(args[0]) in fds else {"ino": None, "path": "?", "pos": 0, "append": False}
            elif name == "lseek":
                f = fds.get(int(args[0]))
                if f is not None:
                    f["pos"] = ret
            elif name in ("write", "writev", "pwrite64", "pwritev", "pwritev2"):
                fd = int(args[0])
                if name.startswith("writev") or name.startswith("pwritev"):
                    data = b"".join(_hex(s) for s in re.findall(r'iov_base=("(?:\\x[0-9a-f]{2})*"(?:\.\.\.)?)', args[1]))
                else:
                    data = _hex(args[1])
                data = data[:ret]
                if fd == 1:
                    stdout = self._answers(stdout + data, ids)
                    continue
                ino = fd_ino(fd)
                if ino is None:
                    continue
                f = fds[fd]
                if name.startswith("p"):
                    off = int(args[3 if name == "pwrite64" else 3], 0)
                else:
                    off = self.size[ino] if f["append"] else f["pos"]
                    f["pos"] = off + len(data)
                self._write(ino, off, data, f"{name} {len(data)} bytes at {off} of {f['path']}")
            elif name in ("fsync", "fdatasync", "sync_file_range"):
                ino = fd_ino(int(args[0]))
                if ino is not None:
                    if name == "sync_file_range":
                        raise ParseError("sync_file_range is not modelled")
                    self.ops.append(Op("sync", ino, what=f"{name} {fds[int(args[0])]['path']}"))
            elif name in ("sync", "syncfs"):
                self.ops.append(Op("sync", -1, what=name))
            elif name in ("ftruncate", "truncate"):
                if name == "ftruncate":
                    ino = fd_ino(int(args[0]))
                    path = fds.get(int(args[0]), {}).get("path", "?")
                else:
                    path, where = resolve(AT_FDCWD, args[0])
                    ino = None if where is None else self.dirs[where[0]][where[1]]
                if ino is not None:
                    size = int(args[1], 0)
                    self.size[ino] = size
                    self.ops.append(Op("trunc", ino, size, what=f"truncate {path} to {size}"))
            elif name in ("rename", "renameat", "renameat2"):
                if name == "rename":
                    (p1, w1), (p2, w2) = resolve(AT_FDCWD, args[0]), resolve(AT_FDCWD, args[1])
                else:
                    (p1, w1), (p2, w2) = resolve(int(args[0]), args[1]), resolve(int(args[2]), args[3])
                if w1 is None and w2 is None:
                    continue
                if w1 is None or w2 is None:
                    raise ParseError(f"rename across the backup directory's edge: {p1} -> {p2}")
                ino = self.dirs[w1[0]][w1[1]]
                self._entry([(w1[0], w1[1], None), (w2[0], w2[1], ino)], f"rename {p1} -> {p2}")
            elif name in ("unlink", "unlinkat", "rmdir"):
                if name == "unlinkat":
                    path, where = resolve(int(args[0]), args[1])
                else:
                    path, where = resolve(AT_FDCWD, args[0])
                if where is not None:
                    self._entry([(where[0], where[1], None)], f"{name} {path}")
            elif name in ("mkdir", "mkdirat"):
                path, where = resolve(int(args[0]), args[1]) if name == "mkdirat" else resolve(AT_FDCWD, args[0])
                if where is not None:
                    self._entry([(where[0], where[1], self._new(True))], f"mkdir {path}")
            elif name in ("fallocate", "link", "linkat", "symlink", "symlinkat", "copy_file_range", "sendfile"):
                touched = [a for a in args if a.startswith('"')]
                inside = any(self._lookup(os.path.join(str(cwd), _hex(a).decode())) for a in touched)
                if inside or (name in ("fallocate", "copy_file_range", "sendfile") and fd_ino(int(args[0])) is not None):
                    raise ParseError(f"{name} under the backup directory is not modelled")
        if stdout.strip():
            raise ParseError(f"an answer on stdout was cut short: {stdout[:100]!r}")

    def _answers(self, buf: bytes, ids: Dict[str, Tuple[str, Tuple[int, ...]]]) -> bytes:
        """Take the complete JSON messages out of what the plugin wrote on stdout; an answer
        counts from the write that completes it, when lightningd can first read it."""
        while b"\n\n" in buf:
            msg, buf = buf.split(b"\n\n", 1)
            if not msg.strip():
                continue
            m = json.loads(msg)
            rid = m.get("id")
            if rid not in ids:
                continue
            what, recs = ids[rid]
            if what == "call":
                if m.get("result") != {"result": "continue"}:
                    raise ParseError(f"the plugin refused {rid}: {m}")
                self.ops.append(Op("ack", records=recs, what=f"answer continue to {rid} (record {recs[0]})"))
            else:
                self.ops.append(Op("ready", records=recs, what=f"answer to {rid}"))
        return buf


def build_ops(rec: Recording) -> Tuple[List[Op], Dict[int, bool]]:
    """The operations of the whole scenario, in order, and which inodes are directories."""
    model = Model(rec.dest)
    process = 0
    for step in rec.scenario.steps:
        if step.kind == "without":
            model.add(Op("lightningd", records=(step.index,), what=f"lightningd commits record {step.index} without the plugin"))
        elif step.kind == "start":
            model.process(rec.straces[process], rec.cwd, rec.ids[process])
            process += 1
    return model.ops, model.is_dir


# --- 3. crash states -----------------------------------------------------------------------


def durable_after(ops: Sequence[Op]) -> List[int]:
    """For each operation, the index of the sync that makes it durable (len(ops) if none does).
    An operation j is on the medium for sure at crash point k (after ops[:k]) iff that index < k."""
    n = len(ops)
    out = [n] * n
    nxt: Dict[int, int] = {}
    every = n  # the next sync()/syncfs()
    for j in range(n - 1, -1, -1):
        op = ops[j]
        if op.kind == "sync":
            if op.ino == -1:
                every = j
            else:
                nxt[op.ino] = j
        elif op.kind in ("write", "trunc"):
            out[j] = min(nxt.get(op.ino, n), every)
        elif op.kind == "entry":
            out[j] = max(min(nxt.get(d, n), every) for d, _, _ in op.changes)
    return out


class FsState:
    """Directory entries and file contents, by inode. A copy shares everything with its
    original; whichever of them writes a file first makes its own copy of that file."""

    def __init__(self, dirs: Dict[int, Dict[str, int]], files: Dict[int, Union[bytes, bytearray]]):
        self.dirs = dirs
        self.files = files
        self._own: Set[int] = set()  # files whose bytearray only this state holds

    def copy(self) -> FsState:
        self._own = set()  # from now on shared with the copy
        return FsState(dict(self.dirs), dict(self.files))

    def _mine(self, ino: int) -> bytearray:
        if ino not in self._own:
            self.files[ino] = bytearray(self.files.get(ino, b""))
            self._own.add(ino)
        b = self.files[ino]
        assert isinstance(b, bytearray)
        return b

    def apply(self, op: Op) -> None:
        if op.kind == "write":
            b = self._mine(op.ino)
            if op.off > len(b):
                b.extend(bytes(op.off - len(b)))
            b[op.off : op.off + len(op.data)] = op.data
        elif op.kind == "trunc":
            b = self._mine(op.ino)
            if op.off <= len(b):
                del b[op.off :]
            else:
                b.extend(bytes(op.off - len(b)))
        elif op.kind == "entry":
            for d, name, target in op.changes:
                entries = dict(self.dirs.get(d, {}))  # copy on write: the dicts are shared between states
                if target is None:
                    entries.pop(name, None)
                else:
                    entries[name] = target
                self.dirs[d] = entries

    def walk(self, is_dir: Dict[int, bool]) -> Iterator[Tuple[str, Optional[int]]]:
        """(relative path, inode) of every file, (relative path, None) of every directory."""

        def rec(ino: int, rel: str, depth: int) -> Iterator[Tuple[str, Optional[int]]]:
            assert depth < 16, "a directory loop"
            for name, child in sorted(self.dirs.get(ino, {}).items()):
                path = f"{rel}/{name}" if rel else name
                if is_dir[child]:
                    yield path, None
                    yield from rec(child, path, depth + 1)
                else:
                    yield path, child

        return rec(ROOT, "", 0)

    def materialise(self, root: Path, is_dir: Dict[int, bool]) -> None:
        root.mkdir()
        for rel, ino in self.walk(is_dir):
            if ino is None:
                (root / rel).mkdir()
            else:
                (root / rel).write_bytes(self.files.get(ino, b""))

    def visible(self, is_dir: Dict[int, bool]) -> str:
        """A digest of the tree as a reader sees it: FORMAT.md has readers ignore `*.partial`
        generation directories and `*.tmp` files, so two states that differ only there are
        restored once."""
        h = hashlib.sha1()
        for rel, ino in self.walk(is_dir):
            parts = rel.split("/")
            if any(p.endswith(".partial") for p in parts) or (ino is not None and parts[-1].endswith(".tmp")):
                continue
            h.update(rel.encode() + b"\0")
            if ino is not None:
                h.update(hashlib.sha1(self.files.get(ino, b"")).digest())
        return h.hexdigest()


@dataclass(frozen=True)
class Variant:
    """How one write reached the medium in part."""

    tag: str  # "torn@N" (first N bytes), "zeros@N" (first N bytes, the rest of a file extension zero), "pages-*"
    op: Op  # the part that did
    reordered: bool = False  # later pages without earlier ones: FORMAT.md calls the result damage


def variants(op: Op, cuts: str) -> List[Variant]:
    """Partial versions of a write: torn at a few byte counts and every page boundary, and
    with its pages reordered. cuts="few" keeps only a handful (for `make test`)."""
    n = len(op.data)
    if n <= 1:
        return []
    pages = [p - op.off for p in range((op.off // PAGE + 1) * PAGE, op.off + n, PAGE)]
    ts = {1, 8, 15, 16, 17, n // 2, n - 1}
    if cuts == "all":
        ts |= set(pages)
    elif pages:
        ts |= {pages[0], pages[-1]}
    out = []
    for t in sorted(x for x in ts if 0 < x < n):
        out.append(Variant(f"torn@{t}", Op("write", op.ino, op.off, op.data[:t], what=op.what)))
        if op.extends:
            out.append(Variant(f"zeros@{t}", Op("write", op.ino, op.off, op.data[:t] + bytes(n - t), what=op.what)))
    if pages:
        last = pages[-1]
        out.append(Variant("pages-last-only", Op("write", op.ino, op.off + last, op.data[last:], what=op.what), True))
        if len(pages) >= 2:
            first = pages[0]
            out.append(Variant("pages-all-but-first", Op("write", op.ino, op.off + first, op.data[first:], what=op.what), True))
    return out


@dataclass
class CrashState:
    key: Tuple[Any, ...]
    make: Callable[[], FsState]  # builds it (states are built only when restored)
    crash_point: int
    description: str
    reordered: bool = False


def crash_states(ops: Sequence[Op], cuts: str = "all", points: Optional[Sequence[int]] = None) -> Iterator[CrashState]:
    """Every state the persistence model allows at every crash point (or at the given ones).
    The same state can come from several crash points: its key says which operations were
    applied, and equal keys mean byte-identical trees."""
    dur = durable_after(ops)
    mut = [j for j, op in enumerate(ops) if op.mutating]
    wanted = None if points is None else set(points)
    base = FsState({ROOT: {}}, {})
    applied = 0  # base holds the operations mut[:applied], all of them durable
    for k in range(len(ops) + 1):
        # Advance the shared base over operations durable at k with nothing optional before
        # them (what is durable stays durable, so this only ever moves forward).
        while applied < len(mut) and mut[applied] < k and dur[mut[applied]] < k:
            base.apply(ops[mut[applied]])
            applied += 1
        if wanted is not None and k not in wanted:
            continue
        window = [j for j in mut[applied:] if j < k]
        yield from _states_at(ops, k, base, applied, window, [j for j in window if dur[j] >= k], cuts)


def _states_at(
    ops: Sequence[Op], k: int, base: FsState, applied: int, window: List[int], optional: List[int], cuts: str
) -> Iterator[CrashState]:
    """At crash point k: the base, then of the window's operations all the durable ones and
    a selection of the optional ones (in program order)."""

    snapshot = base.copy()  # the base moves on; this crash point's states start from it as it is now

    def build(chosen: Set[int], torn: Optional[Tuple[int, Variant]], what: str) -> CrashState:
        def make() -> FsState:
            s = snapshot.copy()
            for j in window:
                if torn is not None and j == torn[0]:
                    s.apply(torn[1].op)
                elif j in chosen:
                    s.apply(ops[j])
            return s

        # Canonical key: how many mutating operations in a row are applied, then the others.
        run = 0
        while run < len(window) and window[run] in chosen:
            run += 1
        rest = tuple(j for j in window[run:] if j in chosen)
        key = (applied + run, rest, None if torn is None else (torn[0], torn[1].tag))
        return CrashState(key, make, k, what, bool(torn and torn[1].reordered))

    must = {j for j in window if j not in optional}
    yield build(must | set(optional), None, "everything written so far")
    for i, j in enumerate(optional):
        prefix = must | set(optional[:i])
        yield build(prefix, None, f"{len(optional) - i} of {len(optional)} unsynced operations lost, from {ops[j].what}")
        if ops[j].kind == "write":
            for v in variants(ops[j], cuts):
                yield build(prefix, (j, v), f"{ops[j].what} reached the medium as {v.tag}, later unsynced ones lost")
    if len(optional) >= 2:
        for j in optional[:-1]:
            yield build(must | set(optional) - {j}, None, f"only {ops[j].what} lost")


# --- 4. checks -----------------------------------------------------------------------------


def db_digest(conn: sqlite3.Connection, skip_rows: Sequence[str] = ()) -> str:
    """Schema and every row of every table (rows of `skip_rows` left out), as one hash."""
    h = hashlib.sha256()
    for row in sorted(conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")):
        h.update(repr(row).encode())
    tables = [
        r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' ORDER BY name")
    ]
    for t in tables:
        if t in skip_rows:
            continue
        h.update(t.encode())
        for row in sorted(repr(r) for r in conn.execute(f'SELECT * FROM "{t}"')):
            h.update(row.encode())
    return h.hexdigest()


def apply_record(conn: sqlite3.Connection, r: Record) -> None:
    """As lightningd commits a call (tests/driver.py LiveDB)."""
    if is_pragma_only(r.writes):
        for w in r.writes:
            conn.execute(w)
        return
    conn.execute("BEGIN")
    for w in r.writes:
        conn.execute(w)
    conn.execute("COMMIT")


def reference_digests(records: Sequence[Record], versions: Set[int], skip_rows: Sequence[str]) -> Dict[int, str]:
    """The digest of lightningd's database at each of `versions` (after the last call with
    that data_version), from the recording itself, not from anything pibackup wrote."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    out = {0: db_digest(conn, skip_rows)} if 0 in versions else {}  # a generation without a transaction yet
    for i, r in enumerate(records):
        apply_record(conn, r)
        v = r.data_version
        if v in versions and (i + 1 == len(records) or records[i + 1].data_version != v):
            out[v] = db_digest(conn, skip_rows)
    conn.close()
    return out


def live_db_at(records: Sequence[Record], upto: int, path: Path) -> None:
    """lightningd's database file after records[:upto]."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    for r in records[:upto]:
        apply_record(conn, r)
    conn.close()


@dataclass
class Bounds:
    """What a restore at a crash point must hold (data_versions)."""

    required: Optional[int]  # every transaction up to this one; None: nothing yet
    allowed: int  # and nothing after this one (the call being answered, at most)
    committed: int  # records lightningd has committed: records[:committed]


def bounds(ops: Sequence[Op], records: Sequence[Record], early: Set[int], critical: Sequence[bool]) -> List[Bounds]:
    """For each crash point: which transactions a restore must hold and may hold.

    Required: every call answered `continue` that is critical (a bulk one may wait in memory:
    FORMAT.md, What the writer guarantees) and, for calls answered before init, only once
    init was answered (hook.py: until then the live database is their only copy). Allowed:
    up to the call after the last one lightningd committed (the one being answered)."""
    out = []
    req: Optional[int] = None
    top = -1  # the last record lightningd committed
    waiting: Set[int] = set()
    for k in range(len(ops) + 1):
        allowed = records[min(top + 1, len(records) - 1)].data_version
        out.append(Bounds(None if req is None else records[req].data_version, allowed, top + 1))
        if k == len(ops):
            break
        op = ops[k]
        if op.kind in ("ack", "lightningd"):
            (i,) = op.records
            top = max(top, i)
            if op.kind == "ack" and i in early:
                waiting.add(i)  # init journals them all, bulk or not, before it answers
            elif op.kind == "ack" and critical[i]:
                req = max(req if req is not None else -1, i)
        elif op.kind == "ready":
            ready = waiting & set(op.records)
            if ready:
                req = max([req if req is not None else -1, *ready])
            waiting -= ready
    return out


@dataclass
class Figures:
    scenario: str
    calls: int = 0
    operations: int = 0  # recorded file-system operations under the backup directory (plus answers)
    crash_points: int = 0
    states: int = 0  # generated, over all crash points
    distinct: int = 0  # by the operations applied
    restored: int = 0  # distinct as a reader sees them (FsState.visible): each restored and checked
    torn_read_as_torn: int = 0  # restores that reported an unfinished append
    reordered_damage: int = 0  # page-reordered writes reported as damage, then restored with --partial
    no_backup_yet: int = 0  # states before the first generation was durable (nothing required yet)
    memo_hits: int = 0  # states whose journal read the same as an earlier one's: the same database (see reader_key)
    cli_checked: int = 0
    restarts_checked: int = 0
    record_seconds: float = 0.0
    explore_seconds: float = 0.0
    failures: List[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"{self.scenario}: {self.calls} calls, {self.operations} operations, {self.crash_points} crash points, "
            f"{self.states} crash states ({self.distinct} distinct, {self.restored} distinct to a reader, each restored): "
            f"{self.torn_read_as_torn} read a torn tail, "
            f"{self.reordered_damage} page-reordered writes reported as damage and restored with --partial, "
            f"{self.no_backup_yet} before the first generation, {self.memo_hits} read like an earlier one; "
            f"{self.cli_checked} restored through the CLI too, "
            f"{self.restarts_checked} continued by a new plugin; recorded in {self.record_seconds:.1f} s, "
            f"explored in {self.explore_seconds:.1f} s; {len(self.failures)} failures"
        )


def _early(steps: Sequence[Step]) -> Set[int]:
    return {i for s in steps if s.kind == "start" for i in s.early}


def _critical(records: Sequence[Record], options: Dict[str, Any]) -> Tuple[List[bool], Tuple[str, ...]]:
    from pibackup.app.config import parse_options
    from pibackup.rules import filter as flt

    cfg = parse_options(options)
    crit = [
        cfg.batch_seconds <= 0 or is_pragma_only(r.writes) or flt.classify(list(r.writes), cfg.filter_tables).critical for r in records
    ]
    return crit, tuple(sorted(cfg.filter_tables))


def explore(
    rec: Recording,
    work: Path,
    cuts: str = "all",
    points: Optional[Sequence[int]] = None,
    cli_every: int = 0,
    restart_every: int = 0,
    restart_special: int = 0,
    log: Callable[[str], None] = lambda s: None,
    full: bool = False,
    ops: Optional[List[Op]] = None,
) -> Figures:
    """Restore every distinct crash state of a recording and check it; see the module doc.
    `points`: only these crash points; `cuts`: "few" or "all" torn variants; every
    `cli_every`-th restored state also through the CLI, every `restart_every`-th one also
    continued by a new plugin, and so are the first `restart_special` states that restore
    reports damaged or that hold no backup yet; `full`: replay the SQL of every state (no reader_key memo)."""
    from pibackup.errors import PibackupError
    from pibackup.modes.journal import restore as rst

    sc = rec.scenario
    records = sc.records
    fig = Figures(sc.name, calls=sum(1 for s in sc.steps if s.kind != "stop" for _ in (s.early if s.kind == "start" else (1,))))
    fig.record_seconds = rec.seconds
    t0 = time.monotonic()
    work.mkdir(parents=True, exist_ok=True)
    recorded, is_dir = build_ops(rec)
    ops = recorded if ops is None else ops  # the tests change them to show the checks can fail
    fig.operations = len(ops)
    fig.crash_points = len(ops) + 1 if points is None else len(set(points))
    critical, filtered = _critical(records, {"pibackup-destination": str(rec.dest), **sc.options})
    bnd = bounds(ops, records, _early(sc.steps), critical)

    # Pass 1: the distinct states (by the operations applied), each with the strictest
    # bounds of the crash points that produce it.
    by_key: Dict[Tuple[Any, ...], Tuple[int, Optional[int], int]] = {}  # key -> (crash point, required, allowed)
    for cs in crash_states(ops, cuts, points):
        fig.states += 1
        by_key[cs.key] = _stricter(by_key.get(cs.key), (cs.crash_point, bnd[cs.crash_point].required, bnd[cs.crash_point].allowed))
    fig.distinct = len(by_key)
    # Pass 2: build each, and group those a reader sees the same (FsState.visible).
    groups: Dict[str, Tuple[int, Optional[int], int]] = {}
    first: Dict[Tuple[Any, ...], str] = {}  # the first key of each group -> its digest
    for cs in crash_states(ops, cuts, points):
        if cs.key not in by_key:
            continue
        vis = cs.make().visible(is_dir)
        if vis not in groups:
            first[cs.key] = vis
        groups[vis] = _stricter(groups.get(vis), by_key.pop(cs.key))
    fig.restored = len(groups)
    log(f"{sc.name}: {fig.states} states at {fig.crash_points} crash points, {fig.distinct} distinct, {fig.restored} to restore")

    # Pass 3: restore and check one state of each group, against the group's strictest bounds.
    results: List[Tuple[str, int, str]] = []  # (where, version, digest) to compare with the reference
    cli_due = restart_due = 0
    n = 0
    memo: Dict[str, Tuple[int, str, bool]] = {}
    reader_key = ReaderKey()
    for cs in crash_states(ops, cuts, points):
        vis = first.pop(cs.key, None)
        if vis is None:
            continue
        n += 1
        point, required, allowed = groups[vis]
        where = f"state {n} (crash point {point}: after {ops[point - 1].what if point else 'nothing'}; {cs.description})"
        tree = work / "state"
        out_db = work / "restored.sqlite3"
        state = cs.make()
        shutil.rmtree(tree, ignore_errors=True)
        mkey = None if full else reader_key(state, is_dir)
        special = False  # damage or no backup at all: a new plugin must cope with it
        if mkey is not None and mkey in memo:
            v, digest, torn = memo[mkey]
            fig.memo_hits += 1
        else:
            state.materialise(tree, is_dir)
            try:
                try:
                    outcome = rst.restore(str(tree), str(out_db), force=True)
                except PibackupError as e:
                    if cs.reordered and "--partial" in str(e):
                        fig.reordered_damage += 1
                        special = True
                        outcome = rst.restore(str(tree), str(out_db), force=True, partial=True)
                    elif required is None and ("no complete backup generation" in str(e) or "is not a pibackup backup" in str(e)):
                        fig.no_backup_yet += 1
                        if restart_special > 0:
                            restart_special -= 1
                            _check_restart(rec, tree, bnd[point], work, filtered, where, fig, rewind=False)
                        continue
                    else:
                        raise
            except PibackupError as e:
                fig.failures.append(f"{where}: restore failed: {e}")
                continue
            v, torn = outcome.last_version, outcome.torn_tail is not None
            conn = sqlite3.connect(f"file:{out_db}?mode=ro", uri=True)
            try:
                digest = db_digest(conn, filtered)
                for t in filtered:
                    exists = conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (t,)).fetchone()
                    if exists and conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0]:
                        fig.failures.append(f"{where}: filtered table {t} has rows")
            finally:
                conn.close()
            if mkey is not None:
                memo[mkey] = (v, digest, torn)
        fig.torn_read_as_torn += torn
        if required is not None and v < required:
            fig.failures.append(f"{where}: restored data_version {v}, but {required} was acknowledged")
        if v > allowed:
            fig.failures.append(f"{where}: restored data_version {v}, beyond {allowed}, the last that may be there")
        results.append((where, v, digest))
        if not tree.exists() and (
            (cli_every and cli_due <= 0) or (special and restart_special > 0) or (restart_every and restart_due <= 0)
        ):
            state.materialise(tree, is_dir)
        if cli_every and cli_due <= 0:
            cli_due = cli_every
            _check_cli(tree, work, digest, filtered, where, fig)
        cli_due -= 1
        if special and restart_special > 0:
            restart_special -= 1
            _check_restart(rec, tree, bnd[point], work, filtered, where, fig, rewind=False)
        elif restart_every and restart_due <= 0 and point > 0:
            restart_due = restart_every
            _check_restart(rec, tree, bnd[point], work, filtered, where, fig, rewind=fig.restarts_checked % 2 == 1)
        restart_due -= 1
        if n % 500 == 0:
            log(f"  {n}/{fig.restored} restored")
    ref = reference_digests(records, {v for _, v, _ in results}, filtered)
    for where, v, digest in results:
        if ref.get(v) != digest:
            fig.failures.append(f"{where}: the restored database is not lightningd's at data_version {v}")
    fig.explore_seconds = time.monotonic() - t0
    return fig


_GEN_DIR = re.compile(r"^gen-\d{6}$")
_SEG_FILE = re.compile(r"^seg-\d{6}\.pbj$")


class ReaderKey:
    """What `restore` depends on, computed from a state in memory: the bytes of every file a
    reader may look at, except that the newest segment of the newest generation counts only
    up to the end of its valid content (journal.SegmentReader), plus whether a torn tail or
    zeros follow. States with the same key restore to the same database (restore is a
    function of those bytes), so only the first is replayed through SQLite; the others
    share its result (`explore(full=True)` replays every one). None when that segment is
    damaged or unreadable: such a state is always restored."""

    def __init__(self) -> None:
        self._cache: Dict[int, Tuple[Any, bytes]] = {}  # id -> (object, sha1) for contents shared between states

    def _sha(self, b: Union[bytes, bytearray], shared: bool) -> bytes:
        if not shared:
            return hashlib.sha1(b).digest()
        hit = self._cache.get(id(b))
        if hit is not None and hit[0] is b:
            return hit[1]
        if len(self._cache) > 256:
            self._cache.clear()
        d = hashlib.sha1(b).digest()
        self._cache[id(b)] = (b, d)
        return d

    def __call__(self, state: FsState, is_dir: Dict[int, bool]) -> Optional[str]:
        from pibackup.store.reader import SegmentReader
        from pibackup.store.segment import JournalError

        entries = list(state.walk(is_dir))
        gens = sorted(rel for rel, ino in entries if ino is None and _GEN_DIR.match(rel))
        newest = None
        if gens:
            segs = sorted(
                rel
                for rel, ino in entries
                if ino is not None and rel.startswith(gens[-1] + "/") and _SEG_FILE.match(rel[len(gens[-1]) + 1 :])
            )
            newest = segs[-1] if segs else None
        h = hashlib.sha1()
        for rel, ino in entries:
            h.update(rel.encode() + b"\0")
            if ino is None:
                continue
            data = state.files.get(ino, b"")
            if rel != newest:
                h.update(self._sha(data, ino not in state._own))
                continue
            try:
                r = SegmentReader(rel, bytes(data))
                for _ in r.frames():
                    pass
            except (JournalError, ValueError):
                return None
            if r.bad_offset is not None and not r.torn:
                return None
            h.update(hashlib.sha1(bytes(data[: r.valid_length])).digest() + (b"torn" if r.bad_offset is not None else b"clean"))
        return h.hexdigest()


def _stricter(a: Optional[Tuple[int, Optional[int], int]], b: Tuple[int, Optional[int], int]) -> Tuple[int, Optional[int], int]:
    """Bounds (crash point, required, allowed) that hold at both of two crash points."""
    if a is None:
        return b
    reqs = [x for x in (a[1], b[1]) if x is not None]
    return (a[0] if (a[1] or -1) >= (b[1] or -1) else b[0], max(reqs) if reqs else None, min(a[2], b[2]))


def _check_cli(tree: Path, work: Path, digest: str, filtered: Sequence[str], where: str, fig: Figures) -> None:
    """The same state restored by `python3 -m pibackup restore`: the same database."""
    out = work / "cli.sqlite3"
    for p in (out,):
        if p.exists():
            p.unlink()
    r = subprocess.run(
        [sys.executable, "-m", "pibackup", "restore", str(tree), str(out)], cwd=driver.REPO, capture_output=True, text=True
    )
    fig.cli_checked += 1
    if r.returncode != 0:
        if "--partial" not in r.stderr:
            fig.failures.append(f"{where}: the CLI failed where the library did not: {r.stderr.strip()}")
        return
    conn = sqlite3.connect(f"file:{out}?mode=ro", uri=True)
    try:
        if db_digest(conn, filtered) != digest:
            fig.failures.append(f"{where}: the CLI restored another database than the library")
    finally:
        conn.close()


def _check_restart(
    rec: Recording, tree: Path, b: Bounds, work: Path, filtered: Sequence[str], where: str, fig: Figures, rewind: bool
) -> None:
    """A new plugin on the crash state, with lightningd's database as it was at the crash
    (or, with `rewind`, without the last committed call: lightningd died between the answer
    and its COMMIT, and sends that call again), goes on through the rest of the recording
    without help; its backup then restores to lightningd's final database."""
    records = rec.scenario.records
    start = b.committed - (1 if rewind and b.committed > 0 else 0)
    root = work / f"restart-{fig.restarts_checked}"
    shutil.rmtree(root, ignore_errors=True)
    dest = root / "usb" / "pibackup"
    dest.parent.mkdir(parents=True)
    shutil.copytree(tree, dest)
    node = Node(root / "node", {"pibackup-destination": str(dest), **rec.scenario.options})
    fig.restarts_checked += 1
    try:
        live_db_at(records, start, node.live.path)
        for step in sessions_of(records, start=start):
            if step.kind == "start":
                node.start([records[i] for i in step.early])
            elif step.kind == "call":
                node.call(records[step.index])
            elif step.kind == "stop":
                node.stop()
        out = root / "restored.sqlite3"
        from pibackup.modes.journal import restore as rst

        rst.restore(str(dest), str(out))
        c1 = sqlite3.connect(f"file:{out}?mode=ro", uri=True)
        c2 = sqlite3.connect(f"file:{node.live.path}?mode=ro", uri=True)
        try:
            if db_digest(c1, filtered) != db_digest(c2, filtered):
                fig.failures.append(f"{where}: after a restart from it, the backup does not restore to lightningd's database")
        finally:
            c1.close()
            c2.close()
    except Exception as e:  # noqa: BLE001 - reported with the state that caused it
        fig.failures.append(f"{where}: a new plugin could not go on from it: {type(e).__name__}: {e}\n{node.log_text()[-2000:]}")
        if node.plugin is not None:
            node.plugin.proc.kill()
            node.plugin.proc.wait()
    finally:
        node.live.close()
        shutil.rmtree(root, ignore_errors=True)


# --- scenarios -----------------------------------------------------------------------------


def small_scenario(records: Sequence[Record]) -> Scenario:
    """`make test`: the first 215 calls of a recording, in three plugin processes. The first
    (a fresh node: a generation without snapshot, its calls before init journalled at init)
    fills a 64 KiB segment and rolls over; after a clean restart the second goes on in the
    same generation, in a new segment; lightningd then commits one call without the plugin
    (a gap), so the third starts generation 2 from a snapshot taken by SQLite's backup API.
    Automatic compaction is off in both scenarios, so each run writes the same files; its
    steps are crashed one by one in test_compact.py."""
    recs = list(records[:215])
    steps = sessions_of(recs, restarts={175: 2, 201: 2}, without=[200])
    opts = {"pibackup-segment-size": "64K", "pibackup-preallocate-kb": 16, "pibackup-compact-ratio": "0"}
    return Scenario("small", recs, steps, opts)


def full_scenario(name: str, records: Sequence[Record]) -> Scenario:
    """`make test-long`: a whole recording with its own restarts, and the first call of each
    later session committed without the plugin (a gap: a new generation from a snapshot),
    with 128 KiB segments and 16 KiB preallocation so that rollovers and extensions happen."""
    recs = list(records)
    later = [i for i in range(1, len(recs)) if recs[i].pre_init and not recs[i - 1].pre_init]
    steps = sessions_of(recs, without=later)
    opts = {"pibackup-segment-size": "128K", "pibackup-preallocate-kb": 16, "pibackup-compact-ratio": "0"}
    return Scenario(name, recs, steps, opts)


def sample_points(ops: Sequence[Op], every: int) -> List[int]:
    """Crash points for a quick run: every one around an operation that is not the steady
    state of appending (a frame's write, its fdatasync, the answer), and one in `every` of the rest."""
    steady = []
    for op in ops:
        frame = op.kind == "write" and not op.extends and ".pbj" in op.what
        steady.append(frame or op.kind in ("ack",) or (op.kind == "sync" and "fdatasync" in op.what and ".pbj" in op.what))
    out = []
    for k in range(len(ops) + 1):
        near = range(max(0, k - 2), min(len(ops), k + 1))
        if any(not steady[j] for j in near) or k % every == 0:
            out.append(k)
    return out
