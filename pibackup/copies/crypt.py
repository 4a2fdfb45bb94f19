"""Client-side encryption of shipped files (FORMAT.md, "Encrypted files").

Authenticated encryption with ChaCha20-Poly1305 from `cryptography`: fast on a Pi's
ARM cores, which lack AES instructions before the Pi 5. Each file gets its own random
file id and a subkey derived from the key and that id, so chunk nonces (the chunk's
index) never repeat under one subkey. Every chunk is bound to the file's header, its
path in the backup directory, its index and whether it is the last one: a remote host
can neither read, alter, reorder, swap nor cut a file without the reader noticing. The
header (version 2) names the copy and the node a file belongs to, so that files of another
copy under the same key are told apart too.

A file grows by whole chunks appended at its end, so an encrypted copy of a growing
journal segment can be shipped with rsync --append-verify.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO, Optional

from pibackup.errors import PibackupError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

MAGIC = b"PBKCRYPT"
# Version 2 binds every file to one copy (copy id) of one node (node id): the header holds
# both and, being part of every chunk's associated data, they are authenticated with it.
# Version 1 files (no binding) are still read: they are what copies made before hold.
VERSION = 2
VERSION_UNBOUND = 1
ALG_CHACHA20_POLY1305 = 1
KEY_SIZE = 32
TAG_SIZE = 16
COPY_ID_SIZE = 16
NODE_ID_SIZE = 33  # a compressed secp256k1 public key, as in lightningd's vars row node_id
HEADER = struct.Struct("<8sBBH8s16s")  # magic, version, algorithm, reserved, key id, file id
HEADER_SIZE = HEADER.size  # 36: version 1
BINDING = struct.Struct("<16s33s3x")  # copy id, node id, reserved
HEADER_V2_SIZE = HEADER_SIZE + BINDING.size  # 88
NO_NODE_ID = bytes(NODE_ID_SIZE)  # the node id was not known when the file was written
CHUNK = struct.Struct("<BI")  # flags, plaintext length
FLAG_FINAL = 1
CHUNK_PLAIN_MAX = 1 << 20  # a reader never holds more than this in memory
KEY_FILE_TAG = "pibackup encryption key v1"


class CryptError(PibackupError):
    pass


@dataclass(frozen=True)
class Key:
    secret: bytes = field(repr=False)  # never in a log line or a traceback
    path: str = ""

    @property
    def key_id(self) -> bytes:
        return key_id(self.secret)


@dataclass(frozen=True)
class Binding:
    """Which copy of which node a version 2 file belongs to."""

    copy_id: bytes
    node_id: bytes = NO_NODE_ID

    def __post_init__(self) -> None:
        if len(self.copy_id) != COPY_ID_SIZE or len(self.node_id) != NODE_ID_SIZE:
            raise ValueError("a copy id is 16 bytes and a node id 33")

    def agrees(self, other: Binding) -> bool:
        """Same copy; and same node, unless one of them did not know its node id yet."""
        nodes_known = NO_NODE_ID not in (self.node_id, other.node_id)
        return self.copy_id == other.copy_id and (not nodes_known or self.node_id == other.node_id)

    def describe(self) -> str:
        node = "an unknown node" if self.node_id == NO_NODE_ID else f"node {self.node_id.hex()}"
        return f"copy {self.copy_id.hex()} of {node}"


def key_id(secret: bytes) -> bytes:
    return hashlib.sha256(b"pibackup key id\0" + secret).digest()[:8]


def load_key(path: str) -> Key:
    """Read a key file written by `pibackup keygen`; say exactly what is wrong with it."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read(4096)
        mode = os.stat(path).st_mode
    except OSError as e:
        raise CryptError(f"cannot read the encryption key {path}: {e.strerror}; create one with: pibackup keygen {path}") from e
    parts = text.split()
    if len(parts) != 5 or " ".join(parts[:4]) != KEY_FILE_TAG:
        raise CryptError(f"{path} is not a pibackup key file (create one with: pibackup keygen FILE)")
    try:
        secret = bytes.fromhex(parts[4])
    except ValueError:
        secret = b""
    if len(secret) != KEY_SIZE:
        raise CryptError(f"{path}: the key is damaged (it must be {KEY_SIZE * 2} hex digits); use your copy of the key file")
    if mode & 0o077:
        raise CryptError(f"{path} can be read by other users; make it private: chmod 600 {path}")
    return Key(secret, path)


def write_key_file(path: str) -> Key:
    """Create a new key file, readable by its owner only; never overwrite one."""
    secret = os.urandom(KEY_SIZE)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError as e:
        raise CryptError(f"{path} exists; a key is never overwritten (its backups would be unreadable)") from e
    except OSError as e:
        raise CryptError(f"cannot create {path}: {e.strerror}") from e
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(f"{KEY_FILE_TAG} {secret.hex()}\n")
        f.flush()
        os.fsync(f.fileno())
    return Key(secret, path)


def _aead(secret: bytes, file_id: bytes) -> ChaCha20Poly1305:
    # Imported here: without encryption the plugin never loads it (6.5 MiB of RSS on a Pi
    # when the Debian package leaves out pyln-proto, which would load it anyway).
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    sub = hmac.new(secret, b"pibackup file key\0" + file_id, hashlib.sha256).digest()
    return ChaCha20Poly1305(sub)


def _nonce(index: int) -> bytes:
    return b"\0\0\0\0" + struct.pack("<Q", index)


def _aad(header: bytes, relpath: str, index: int, flags: int, length: int) -> bytes:
    return header + relpath.encode() + b"\0" + struct.pack("<Q", index) + CHUNK.pack(flags, length)


def is_encrypted(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


class Encryptor:
    """Appends chunks to one encrypted file. `relpath` is the file's path in the backup
    directory (e.g. gen-000001/seg-000002.pbj): it is authenticated with every chunk."""

    def __init__(
        self,
        key: Key,
        relpath: str,
        file_id: Optional[bytes] = None,
        next_index: int = 0,
        binding: Optional[Binding] = None,
    ):
        """With a binding: a version 2 file, bound to that copy and node (what the shipper
        writes). Without: version 1, as written before bindings existed."""
        self.key = key
        self.relpath = relpath
        self.file_id = file_id or os.urandom(16)
        version = VERSION if binding is not None else VERSION_UNBOUND
        self.header = HEADER.pack(MAGIC, version, ALG_CHACHA20_POLY1305, 0, key.key_id, self.file_id)
        if binding is not None:
            self.header += BINDING.pack(binding.copy_id, binding.node_id)
        self.index = next_index
        self._aead = _aead(key.secret, self.file_id)

    def chunk(self, plain: bytes, final: bool = False) -> bytes:
        flags = FLAG_FINAL if final else 0
        out = CHUNK.pack(flags, len(plain)) + self._aead.encrypt(
            _nonce(self.index), plain, _aad(self.header, self.relpath, self.index, flags, len(plain))
        )
        self.index += 1
        return out

    def chunks(self, plain: bytes, final: bool = False) -> bytes:
        """Plaintext of any size as chunks of at most CHUNK_PLAIN_MAX bytes."""
        parts = [plain[i : i + CHUNK_PLAIN_MAX] for i in range(0, len(plain), CHUNK_PLAIN_MAX)] or [b""]
        return b"".join(self.chunk(p, final and i == len(parts) - 1) for i, p in enumerate(parts))


@dataclass
class FileHeader:
    raw: bytes  # as authenticated with every chunk
    version: int
    key_id: bytes
    file_id: bytes
    binding: Optional[Binding]  # None in a version 1 file: not bound to a copy


def read_header(f: BinaryIO, src_path: str, key: Key) -> FileHeader:
    """The header of an encrypted file, checked against `key` (before anything is decrypted)."""
    header = f.read(HEADER_SIZE)
    if len(header) < HEADER_SIZE or not header.startswith(MAGIC):
        raise CryptError(f"{src_path} is not an encrypted pibackup file (was the copy made without encryption?)")
    _, version, alg, _, kid, file_id = HEADER.unpack(header)
    if version not in (VERSION_UNBOUND, VERSION) or alg != ALG_CHACHA20_POLY1305:
        raise CryptError(f"{src_path}: encryption format {version}/{alg} is unknown to this pibackup; use a newer one")
    if kid != key.key_id:
        raise CryptError(
            f"{src_path} was encrypted with another key (key id {kid.hex()}; {key.path or 'yours'} is {key.key_id.hex()})"
        )
    binding = None
    if version == VERSION:
        more = f.read(BINDING.size)
        if len(more) < BINDING.size:
            raise CryptError(f"{src_path}: its header is cut short: the file was altered or damaged")
        copy_id, node_id = BINDING.unpack(more)
        binding = Binding(copy_id, node_id)
        header += more
    return FileHeader(header, version, kid, file_id, binding)


def file_header(src_path: str, key: Key) -> FileHeader:
    with open(src_path, "rb") as f:
        return read_header(f, src_path, key)


@dataclass
class Decrypted:
    final: bool  # the writer closed the file: a final chunk was found
    torn: bool  # an incomplete chunk at the end: an append cut short
    binding: Optional[Binding] = None  # None: a version 1 file, not bound to a copy


def decrypt_file(src_path: str, dst: BinaryIO, key: Key, relpath: str) -> Decrypted:
    """Decrypt src_path into dst. Damage or tampering raises CryptError naming the file.
    A version 2 file's binding is authenticated (it is part of the header); the caller
    checks that it is the copy it expects."""
    with open(src_path, "rb") as f:
        h = read_header(f, src_path, key)
        header, binding = h.raw, h.binding
        aead = _aead(key.secret, h.file_id)
        index = 0
        while True:
            head = f.read(CHUNK.size)
            if not head:
                return Decrypted(final=False, torn=False, binding=binding)
            if len(head) < CHUNK.size:
                return Decrypted(final=False, torn=True, binding=binding)
            flags, length = CHUNK.unpack(head)
            if length > CHUNK_PLAIN_MAX or flags & ~FLAG_FINAL:
                raise CryptError(f"{src_path}: chunk {index} is damaged or was altered (bad chunk header)")
            body = f.read(length + TAG_SIZE)
            if len(body) < length + TAG_SIZE:
                return Decrypted(final=False, torn=True, binding=binding)
            try:
                plain = aead.decrypt(_nonce(index), body, _aad(header, relpath, index, flags, length))
            except Exception as e:  # cryptography's InvalidTag
                raise CryptError(
                    f"{src_path}: chunk {index} fails authentication: the file was altered, damaged, or belongs elsewhere"
                ) from e
            dst.write(plain)
            index += 1
            if flags & FLAG_FINAL:
                if f.read(1):
                    raise CryptError(f"{src_path}: data after the final chunk: the file was altered")
                return Decrypted(final=True, torn=False, binding=binding)

