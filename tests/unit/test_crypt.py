"""The encrypted file format of shipped copies (FORMAT.md, "Encrypted files")."""

from __future__ import annotations

import io
import os
import random
import stat

import pytest

from helpers import cli
from pibackup.copies.crypt import CryptError, Encryptor, decrypt_file, load_key, write_key_file

REL = "gen-000001/seg-000001.pbj"


def encrypted(key, plain_parts, final=True, rel=REL):
    e = Encryptor(key, rel)
    data = e.header
    for i, p in enumerate(plain_parts):
        data += e.chunk(p, final=final and i == len(plain_parts) - 1)
    return data


def decrypt(path, key, rel=REL):
    out = io.BytesIO()
    d = decrypt_file(str(path), out, key, rel)
    return out.getvalue(), d


@pytest.fixture
def key(tmp_path):
    return write_key_file(str(tmp_path / "k"))


def test_round_trip_open_and_closed(tmp_path, key):
    parts = [os.urandom(n) for n in (0, 1, 1000, 70000)]
    p = tmp_path / "f"
    p.write_bytes(encrypted(key, parts, final=True))
    plain, d = decrypt(p, key)
    assert plain == b"".join(parts) and d.final and not d.torn
    p.write_bytes(encrypted(key, parts, final=False))
    plain, d = decrypt(p, key)
    assert plain == b"".join(parts) and not d.final and not d.torn


def test_every_single_bit_flip_is_detected(tmp_path, key):
    """A flip fails authentication, or (in a length field, pointing past the end) makes a
    closed file end unfinished, which decrypt_tree refuses as cut short."""
    rng = random.Random(3)
    good = encrypted(key, [os.urandom(300), os.urandom(50)])
    p = tmp_path / "f"
    for _ in range(500):
        d = bytearray(good)
        d[rng.randrange(len(d))] ^= 1 << rng.randrange(8)
        p.write_bytes(bytes(d))
        try:
            _, result = decrypt(p, key)
        except CryptError:
            continue
        assert not result.final


def test_cuts_are_seen_as_unfinished_never_as_other_content(tmp_path, key):
    parts = [b"a" * 100, b"b" * 100, b"c" * 100]
    good = encrypted(key, parts)
    p = tmp_path / "f"
    for n in range(36, len(good)):
        p.write_bytes(good[:n])
        plain, d = decrypt(p, key)
        assert not d.final
        assert b"".join(parts).startswith(plain)


def test_a_file_moved_to_another_name_or_reordered_chunks_fail(tmp_path, key):
    p = tmp_path / "f"
    p.write_bytes(encrypted(key, [b"x" * 10]))
    with pytest.raises(CryptError, match="fails authentication"):
        decrypt(p, key, rel="gen-000001/seg-000002.pbj")
    e = Encryptor(key, REL)
    c0, c1 = e.chunk(b"first"), e.chunk(b"second", final=True)
    p.write_bytes(e.header + c1 + c0)
    with pytest.raises(CryptError, match="chunk 0 fails authentication"):
        decrypt(p, key)
    p.write_bytes(e.header + c0 + c1 + b"more")
    with pytest.raises(CryptError, match="data after the final chunk"):
        decrypt(p, key)


def test_another_key_is_named(tmp_path, key):
    p = tmp_path / "f"
    p.write_bytes(encrypted(key, [b"x"]))
    other = write_key_file(str(tmp_path / "other"))
    with pytest.raises(CryptError, match=f"encrypted with another key \\(key id {key.key_id.hex()}"):
        decrypt(p, other)


def test_keygen_writes_a_private_key_once(tmp_path):
    k = tmp_path / "pibackup.key"
    r = cli("keygen", str(k))
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(k.stat().st_mode) == 0o600
    key = load_key(str(k))
    assert key.key_id.hex() in r.stdout and "copy it somewhere safe" in r.stdout
    before = k.read_bytes()
    r = cli("keygen", str(k))
    assert r.returncode == 1 and "exists; a key is never overwritten" in r.stderr
    assert k.read_bytes() == before


def test_a_closed_segment_that_lost_its_zeros_after_listing_stages_whole(tmp_path):
    """The compactor trims a closed segment's preallocated zeros outside the writer's lock,
    so the shipper may list it at its old length and find it shorter: the staged copy ends
    where the file ends, finished (its final chunk), not a failed round."""
    from pibackup.copies.crypt import Key, decrypt_file
    from pibackup.copies.staging import Staging
    from pibackup.copies.state import FileState

    dest = tmp_path / "pibackup"
    (dest / "gen-000001").mkdir(parents=True)
    seg = dest / "gen-000001" / "seg-000001.pbj"
    content = os.urandom(5000)
    seg.write_bytes(content)
    key = Key(os.urandom(32))
    staging = Staging(str(dest), key)
    staging.open()  # what the shipper's start does: the directory and the copy id
    st = FileState()
    rel = "gen-000001/seg-000001.pbj"
    assert staging.stage(rel, str(seg), len(content) + 4096, True, st)  # listed with its zeros
    assert st.final and st.staged == len(content)
    out = io.BytesIO()
    d = decrypt_file(staging.path(rel), out, key, rel)
    assert d.final and not d.torn and out.getvalue() == content
