"""The node id an hsm_secret gives, derived as Core Lightning's hsmd does, so a restore can
tell whether a database belongs with the hsm_secret beside it before lightningd starts.

The file's formats, as Core Lightning v26 reads them (common/hsm_secret.c):
  - 32 bytes: the secret itself (the format before v25.12);
  - 73 bytes: that secret encrypted with a passphrase (--encrypted-hsm): cannot be checked;
  - otherwise 32 bytes then a BIP39 mnemonic in ASCII: the first 32 bytes are zero when the
    mnemonic has no passphrase (the secret is then the BIP39 seed of the words), else a hash
    of the seed with its passphrase (cannot be checked without it).
hsmd's node key (hsmd/libhsmd.c, node_key): HKDF-SHA256 over the first 32 bytes of the
secret, info "nodeid", salt a 32-bit little-endian counter from 0, taking the first counter
whose output is a valid secp256k1 private key. The public key is the node id.
"""

from __future__ import annotations

import hashlib
import struct
import unicodedata
from dataclasses import dataclass
from typing import Optional

PLAIN_LEN = 32
ENCRYPTED_LEN = 73  # libsodium secretstream header (24) + 32 bytes + its tag (17)
PASSPHRASE_HASH_LEN = 32
# secp256k1's group order: a private key must be in [1, n-1].
_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


@dataclass(frozen=True)
class HsmSecret:
    """What an hsm_secret file is, and the node id when it can be told without a passphrase."""

    kind: str  # "plain", "mnemonic", "encrypted", "mnemonic with passphrase", "invalid"
    node_id: Optional[bytes] = None

    @property
    def checkable(self) -> bool:
        return self.node_id is not None


def node_id_from_secret(secret: bytes) -> bytes:
    """hsmd's node id (33-byte compressed public key) for the secret's first 32 bytes."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    counter = 0
    while True:  # one chance in 2**127 of a second round, as hsmd says
        key = HKDF(hashes.SHA256(), 32, struct.pack("<I", counter), b"nodeid").derive(secret[:32])
        value = int.from_bytes(key, "big")
        if 0 < value < _ORDER:
            break
        counter += 1
    public = ec.derive_private_key(value, ec.SECP256K1()).public_key()
    return public.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)


def bip39_seed(mnemonic: str, passphrase: str = "") -> bytes:
    """BIP39's seed of a mnemonic: PBKDF2-HMAC-SHA512, 2048 rounds, salt "mnemonic" + passphrase."""
    words = unicodedata.normalize("NFKD", mnemonic).encode()
    salt = ("mnemonic" + unicodedata.normalize("NFKD", passphrase)).encode()
    return hashlib.pbkdf2_hmac("sha512", words, salt, 2048)


def read_hsm_secret(data: bytes) -> HsmSecret:
    """Tell an hsm_secret file's format from its bytes, as lightningd does, and its node id."""
    if len(data) < PLAIN_LEN:
        return HsmSecret("invalid")
    if len(data) == PLAIN_LEN:
        return HsmSecret("plain", node_id_from_secret(data))
    if len(data) == ENCRYPTED_LEN:
        return HsmSecret("encrypted")
    if any(data[:PASSPHRASE_HASH_LEN]):
        return HsmSecret("mnemonic with passphrase")
    try:
        mnemonic = data[PASSPHRASE_HASH_LEN:].decode("ascii")
    except UnicodeDecodeError:
        return HsmSecret("invalid")
    if len(mnemonic.split()) < 12:
        return HsmSecret("invalid")
    return HsmSecret("mnemonic", node_id_from_secret(bip39_seed(mnemonic)))
