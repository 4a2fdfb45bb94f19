"""Compressed snapshot files (`snapshot-vN.pbsnap`, FORMAT.md "Compressed snapshot"): the
database file cut into chunks of CHUNK bytes, each deflated on its own and stored after a
record with its lengths and its plain bytes' BLAKE2b-256.

Chunks deflated on their own let a compaction carry a chunk of the old snapshot whose plain
bytes did not change into the new one as it is stored, without deflating it again
(docs/design/compaction.md). Everything here reads and writes in one chunk at a time: memory
stays the same whatever the database's size. Backups of format 1 hold plain SQLite snapshots
(`snapshot-vN.sqlite3`): `plain_chunks` reads both.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator, Optional, Tuple

from pibackup.errors import DamageError
from pibackup.store.fsio import private_file

MAGIC = b"PIBKSNAP"
END_MAGIC = b"PIBKSEND"
VERSION = 1
HEADER_SIZE = 128
CHUNK = 64 * 1024  # plain bytes per chunk (the last is shorter); why this size: docs/design/compaction.md
LEVEL = 1  # zlib's level; why this one: docs/design/compaction.md
COMPRESSION_ZLIB = 1
NODE_ID_BYTES = 33
GENESIS_BYTES = 32
_HEADER = struct.Struct(">8sHHIQIB3s33s32s")  # up to the reserved bytes; CRC-32 at 124
_RECORD = struct.Struct(">II32s")  # stored length, plain length, BLAKE2b-256 of the plain bytes
_TRAILER = struct.Struct(">8sIQ")  # END_MAGIC, chunk count, plain bytes in all
MAX_CHUNK = 64 << 20


@dataclass(frozen=True)
class SnapHeader:
    chunk_size: int
    database_bytes: int
    data_version: int
    node_id: bytes  # all zero when the database had none yet
    genesis_hash: bytes

    def encode(self) -> bytes:
        body = _HEADER.pack(
            MAGIC,
            VERSION,
            HEADER_SIZE,
            self.chunk_size,
            self.database_bytes,
            self.data_version,
            COMPRESSION_ZLIB,
            bytes(3),
            self.node_id,
            self.genesis_hash,
        )
        body = body.ljust(HEADER_SIZE - 4, b"\0")
        return body + struct.pack(">I", zlib.crc32(body))


def identity_rows(conn: sqlite3.Connection) -> Tuple[bytes, bytes]:
    """The node id and genesis hash (vars rows) of a database being made a snapshot; empty
    when it has none yet. The snapshot's header carries them: who the snapshot belongs to is
    read without inflating it."""
    try:
        rows = conn.execute("SELECT name, blobval, val FROM vars WHERE name IN ('node_id', 'genesis_hash')").fetchall()
    except sqlite3.Error:
        return b"", b""
    found = {}
    for name, blob, text in rows:
        if isinstance(blob, bytes):
            found[name] = blob
        elif isinstance(text, str):  # an old database kept them as hex text
            try:
                found[name] = bytes.fromhex(text)
            except ValueError:
                pass
    node, genesis = found.get("node_id", b""), found.get("genesis_hash", b"")
    return (node if len(node) == NODE_ID_BYTES else b"", genesis if len(genesis) == GENESIS_BYTES else b"")


def database_bytes(path: str) -> int:
    """The size of the database a snapshot holds (a plain one's is its file's); 0 when it
    cannot be read. The compaction's threshold is a share of this, not of the compressed
    file: the journal a compaction folds in, and so its cost per transaction, stays what it
    was with plain snapshots (docs/design/compaction.md)."""
    try:
        return read_header(path).database_bytes if is_compressed(path) else os.path.getsize(path)
    except (OSError, DamageError):
        return 0


def is_compressed(path: str) -> bool:
    return path.endswith(".pbsnap")


def _digest(b: bytes) -> bytes:
    return hashlib.blake2b(b, digest_size=32).digest()


def decode_header(raw: bytes, path: str) -> SnapHeader:
    if len(raw) < HEADER_SIZE or raw[:8] != MAGIC:
        raise DamageError(f"{path}: snapshot is damaged (no PIBKSNAP header)", path, 0)
    magic, version, size, chunk, total, dv, comp, _, node, genesis = _HEADER.unpack_from(raw)
    if version != VERSION:
        raise DamageError(f"{path}: snapshot version {version}: written by another release of pibackup", path, 8)
    if struct.unpack_from(">I", raw, HEADER_SIZE - 4)[0] != zlib.crc32(raw[: HEADER_SIZE - 4]):
        raise DamageError(f"{path}: snapshot is damaged (its header's checksum)", path, 0)
    if size != HEADER_SIZE or comp != COMPRESSION_ZLIB or not 0 < chunk <= MAX_CHUNK:
        raise DamageError(f"{path}: snapshot is damaged (its header: size {size}, compression {comp}, chunk {chunk})", path, 0)
    return SnapHeader(chunk, total, dv, node, genesis)


def read_header(path: str) -> SnapHeader:
    with open(path, "rb") as f:
        return decode_header(f.read(HEADER_SIZE), path)


class _Sha:
    """Reads a file and hashes every byte read: the whole file's SHA-256 is in the journal."""

    def __init__(self, f: BinaryIO):
        self.f = f
        self.h = hashlib.sha256()

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        self.h.update(b)
        return b


def _records(r: _Sha, path: str, header: SnapHeader) -> Iterator[Tuple[int, bytes, bytes]]:
    """(plain length, BLAKE2b of the plain bytes, stored bytes) of every chunk, in order;
    checks the trailer."""
    count = total = 0
    while True:
        raw = r.read(_RECORD.size)
        if raw[:8] == END_MAGIC:
            if len(raw) != _TRAILER.size:  # at the file's end, a read of a record's size gets the trailer's
                raise DamageError(f"{path}: snapshot is damaged (bytes after its trailer)", path, None)
            _, n, plain = _TRAILER.unpack(raw)
            if n != count or plain != total or plain != header.database_bytes:
                raise DamageError(f"{path}: snapshot is damaged (its trailer does not match its chunks)", path, None)
            return
        if len(raw) != _RECORD.size:
            break
        stored, plain_len, digest = _RECORD.unpack(raw)
        if plain_len > header.chunk_size or stored > plain_len + (plain_len >> 3) + 1024:
            raise DamageError(f"{path}: snapshot is damaged (chunk {count}: lengths)", path, None)
        data = r.read(stored)
        if len(data) != stored:
            break
        yield plain_len, digest, data
        count += 1
        total += plain_len
    raise DamageError(f"{path}: snapshot is damaged (cut short after {count} chunks)", path, None)


def plain_chunks(path: str, expected_sha256: Optional[bytes]) -> Iterator[bytes]:
    """The database file a snapshot holds, in pieces, whichever format it is in; each piece is
    checked as it is read, and the whole file's SHA-256 against `expected_sha256` at the end
    (a DamageError then: use nothing written from the pieces)."""
    with open(path, "rb") as f:
        r = _Sha(f)
        if not is_compressed(path):
            while True:
                b = r.read(CHUNK)
                if not b:
                    break
                yield b
        else:
            header = decode_header(r.read(HEADER_SIZE), path)
            for n, (plain_len, digest, data) in enumerate(_records(r, path, header)):
                try:
                    b = zlib.decompress(data, bufsize=plain_len)
                except zlib.error as e:
                    raise DamageError(f"{path}: snapshot is damaged (chunk {n} cannot be inflated: {e})", path, None) from e
                if len(b) != plain_len or _digest(b) != digest:
                    raise DamageError(f"{path}: snapshot is damaged (chunk {n}: its hash does not match)", path, None)
                yield b
        if expected_sha256 is not None and r.h.digest() != expected_sha256:
            raise DamageError(f"{path}: snapshot is damaged (its SHA-256 does not match the journal's header)", path, None)


def carried_chunks(path: Optional[str], chunk_size: int) -> Iterator[Optional[Tuple[bytes, int, bytes]]]:
    """(BLAKE2b of the plain bytes, plain length, stored bytes) of an earlier compressed
    snapshot's chunks, in order, then None for ever: what a new snapshot may carry. Nothing
    to carry from a plain snapshot, one of another chunk size, or a damaged one (the new
    snapshot is then deflated whole; the journal's check of the old one says the rest)."""
    if path is not None and is_compressed(path):
        try:
            with open(path, "rb") as f:
                r = _Sha(f)
                header = decode_header(r.read(HEADER_SIZE), path)
                if header.chunk_size == chunk_size:
                    for plain_len, digest, data in _records(r, path, header):
                        yield digest, plain_len, data
        except (OSError, DamageError):
            pass
    while True:
        yield None


@dataclass(frozen=True)
class Written:
    sha256: bytes
    size: int
    chunks: int
    carried: int


def write_compressed(
    plain: str,
    target: str,
    data_version: int,
    identity: Tuple[bytes, bytes],
    previous: Optional[str] = None,
    sync_every: int = 0,
    tick: Optional[Callable[[int], None]] = None,
) -> Written:
    """Write the database file `plain` as a compressed snapshot `target` (created private,
    written, synced). A chunk whose plain bytes hash as the same chunk of `previous` did is
    copied from it as stored. `sync_every` bytes the output is synced (the hook's syncs never
    wait behind one big one); `tick(plain bytes done)` after every chunk."""
    node, genesis = identity
    total = os.path.getsize(plain)
    header = SnapHeader(CHUNK, total, data_version, node.ljust(NODE_ID_BYTES, b"\0"), genesis.ljust(GENESIS_BYTES, b"\0"))
    h = hashlib.sha256()
    chunks = carried = written = done = unsynced = 0
    old = carried_chunks(previous, CHUNK)
    with open(plain, "rb") as fi, os.fdopen(private_file(target), "wb") as fo:

        def put(b: bytes) -> None:
            nonlocal written, unsynced
            h.update(b)
            fo.write(b)
            written += len(b)
            unsynced += len(b)

        put(header.encode())
        while True:
            b = fi.read(CHUNK)
            if not b:
                break
            digest = _digest(b)
            was = next(old)
            if was is not None and was[0] == digest and was[1] == len(b):
                stored = was[2]
                carried += 1
            else:
                stored = zlib.compress(b, LEVEL)
            put(_RECORD.pack(len(stored), len(b), digest))
            put(stored)
            chunks += 1
            done += len(b)
            if sync_every and unsynced >= sync_every:
                fo.flush()
                os.fdatasync(fo.fileno())
                unsynced = 0
            if tick is not None:
                tick(done)
        if done != total:
            raise DamageError(f"{plain} changed while it was compressed ({done} bytes, {total} at the start)", plain, None)
        put(_TRAILER.pack(END_MAGIC, chunks, done))
        fo.flush()
        os.fsync(fo.fileno())
    return Written(h.digest(), written, chunks, carried)


def expand(src: str, target: str, expected_sha256: Optional[bytes], sync_every: int = 0) -> None:
    """Write the database a snapshot holds to `target` (created private), checking it."""
    unsynced = 0
    with os.fdopen(private_file(target), "wb") as fo:
        for b in plain_chunks(src, expected_sha256):
            fo.write(b)
            unsynced += len(b)
            if sync_every and unsynced >= sync_every:
                fo.flush()
                os.fdatasync(fo.fileno())
                unsynced = 0


def check(path: str, expected_sha256: Optional[bytes], inflate: bool = False) -> None:
    """A snapshot's bytes against the journal's SHA-256 and, compressed, its structure: every
    record, its lengths, the trailer. Reads at the medium's speed: SHA-256 proves the file is
    the one its writer wrote, and so that its chunks inflate to what their hashes say.
    `inflate`: also inflate and hash every chunk, as restore does."""
    if inflate or not is_compressed(path):
        for _ in plain_chunks(path, expected_sha256):
            pass
        return
    with open(path, "rb") as f:
        r = _Sha(f)
        header = decode_header(r.read(HEADER_SIZE), path)
        for _ in _records(r, path, header):
            pass
        if expected_sha256 is not None and r.h.digest() != expected_sha256:
            raise DamageError(f"{path}: snapshot is damaged (its SHA-256 does not match the journal's header)", path, None)
