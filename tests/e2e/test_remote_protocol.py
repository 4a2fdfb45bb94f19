"""The remote protocol and the receiver's rules, in-process: framing, checksums, garbage and
cut streams, version and identity refusals, --append-only, offsets, torn tails."""

from __future__ import annotations

import io
import json
import os
import zlib
from pathlib import Path
from typing import List

import pytest

from pibackup.remote.protocol import (
    ACK,
    APPEND,
    ERROR,
    FINISH,
    HEAD,
    HELLO,
    PROTOCOL_VERSION,
    PUT,
    WELCOME,
    Message,
    ProtocolError,
    encode,
    read_message,
)
from pibackup.remote.serve import serve
from pibackup.remote.tree import IDENTITY, Tree

COPY = "11" * 16
NODE = "02" + "ab" * 32


def hello(seq: int = 1, **meta: object) -> Message:
    fields = {"protocol": PROTOCOL_VERSION, "copy_id": COPY, "node_id": NODE, "encrypted": False}
    fields.update(meta)
    return Message(HELLO, seq, fields)


def session(root: Path, messages: List[Message], append_only: bool = False, raw: bytes = b"") -> List[Message]:
    """Run the receiver on these messages (then `raw` bytes); its answers."""
    inp = io.BytesIO(b"".join(encode(m) for m in messages) + raw)
    out = io.BytesIO()
    serve(inp, out, Tree(str(root), append_only, keep=3))
    out.seek(0)
    answers = []
    while out.tell() < len(out.getvalue()):
        answers.append(read_message(out))
    return answers


def test_a_message_round_trips_and_every_flipped_bit_is_caught():
    data = encode(Message(APPEND, 7, {"path": "gen-000001/seg-000001.pbj", "offset": 0, "sync": True}, b"frame bytes"))
    m = read_message(io.BytesIO(data))
    assert (m.type, m.seq, m.meta["offset"], m.data) == (APPEND, 7, 0, b"frame bytes")
    for bit in range(len(data) * 8):
        bad = bytearray(data)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(ProtocolError):
            read_message(io.BytesIO(bytes(bad)))


def test_a_cut_message_and_garbage_are_told_apart_from_a_closed_stream():
    data = encode(Message(PUT, 1, {"path": "PIBACKUP", "offset": 0}, b"x" * 100))
    for cut in range(1, len(data)):
        with pytest.raises(ProtocolError, match="ends inside a message"):
            read_message(io.BytesIO(data[:cut]))
    with pytest.raises(ProtocolError, match="not a pibackup message"):
        read_message(io.BytesIO(b"bash: pibackup: command not found\n" + b"\0" * 20))


def test_oversized_lengths_are_refused_before_anything_is_read():
    head = b"PBRM" + bytes([APPEND, 0, 0, 0]) + (1).to_bytes(8, "little") + (1 << 30).to_bytes(4, "little") + (0).to_bytes(4, "little")
    with pytest.raises(ProtocolError, match="more than the protocol allows"):
        read_message(io.BytesIO(head))


def test_hello_lists_an_empty_directory_and_records_whose_copy_it_is(tmp_path):
    answers = session(tmp_path, [hello()])
    assert answers[0].type == WELCOME and answers[0].meta["files"] == {} and answers[0].meta["protocol"] == PROTOCOL_VERSION
    assert json.loads((tmp_path / IDENTITY).read_text())["copy_id"] == COPY


def test_another_protocol_version_is_refused_naming_both(tmp_path):
    answers = session(tmp_path, [hello(protocol=PROTOCOL_VERSION + 1)])
    assert answers[0].type == ERROR
    assert f"the sender speaks {PROTOCOL_VERSION + 1}" in answers[0].meta["error"]
    assert f"speaks {PROTOCOL_VERSION}" in answers[0].meta["error"]


def test_a_directory_of_another_copy_or_node_or_of_someone_else_is_refused(tmp_path):
    session(tmp_path, [hello()])
    other = session(tmp_path, [hello(copy_id="22" * 16)])[0]
    assert other.type == ERROR and "holds another backup" in other.meta["error"]
    node = session(tmp_path, [hello(node_id="03" + "cd" * 32)])[0]
    assert node.type == ERROR and "holds the backup of node" in node.meta["error"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    answer = session(foreign, [hello()])[0]
    assert answer.type == ERROR and "holds files this receiver did not write" in answer.meta["error"]
    assert (foreign / "notes.txt").read_text() == "mine"


def test_operations_before_hello_names_outside_the_layout_and_wrong_offsets_are_refused(tmp_path):
    seg = "gen-000001/seg-000001.pbj"
    first = session(tmp_path, [Message(APPEND, 1, {"path": seg, "offset": 0, "sync": True}, b"x")])[0]
    assert first.type == ERROR and "must be HELLO" in first.meta["error"]
    for path in ("../x", "gen-000001/../../etc/passwd", "HEAD", "gen-000001/notes"):
        a = session(tmp_path, [hello(), Message(APPEND, 2, {"path": path, "offset": 0, "sync": False}, b"x")])
        assert a[1].type == ERROR and "not a file of a backup directory" in a[1].meta["error"], path
    ops = [
        Message(APPEND, 2, {"path": seg, "offset": 0, "sync": True}, b"abc"),
        Message(APPEND, 3, {"path": seg, "offset": 1, "sync": True}, b"x"),
    ]
    a = session(tmp_path, [hello(), *ops])
    assert [m.type for m in a] == [WELCOME, ACK, ERROR] and "append at offset 1" in a[2].meta["error"]
    assert (tmp_path / seg).read_bytes() == b"abc"


def test_append_only_never_rewrites_a_whole_file(tmp_path):
    snap = "gen-000001/snapshot-v5.sqlite3"
    put = [Message(PUT, 2, {"path": snap, "offset": 0}, b"one"), Message(FINISH, 3, {"path": snap, "size": 3})]
    assert [m.type for m in session(tmp_path, [hello(), *put], append_only=True)] == [WELCOME, ACK, ACK]
    again = [Message(PUT, 2, {"path": snap, "offset": 0}, b"two")]
    a = session(tmp_path, [hello(), *again], append_only=True)
    assert a[1].type == ERROR and "--append-only" in a[1].meta["error"]
    assert (tmp_path / snap).read_bytes() == b"one"


def test_a_garbage_message_ends_the_session_with_an_error_and_changes_nothing(tmp_path):
    a = session(tmp_path, [hello()], raw=b"GARBAGE!" * 10)
    assert a[-1].type == ERROR and "broken message" in a[-1].meta["error"]
    msg = encode(Message(APPEND, 2, {"path": "gen-000001/seg-000001.pbj", "offset": 0, "sync": True}, b"data"))
    a = session(tmp_path, [hello()], raw=msg[:-3])
    assert a[-1].type == ERROR and "ends inside a message" in a[-1].meta["error"]
    seg = tmp_path / "gen-000001" / "seg-000001.pbj"
    assert not seg.exists() or seg.read_bytes() == b""


def test_a_half_put_file_is_dropped_and_the_head_is_replaced_durably(tmp_path):
    snap = "gen-000001/snapshot-v5.sqlite3"
    session(tmp_path, [hello(), Message(PUT, 2, {"path": snap, "offset": 0}, b"half")])
    assert (tmp_path / (snap + ".tmp")).exists()
    a = session(tmp_path, [hello(), Message(HEAD, 2, {"generation": "gen-000001"}, b'{"x":1}\n')])
    assert [m.type for m in a] == [WELCOME, ACK]
    assert a[0].meta["files"] == {} and not (tmp_path / (snap + ".tmp")).exists()
    assert (tmp_path / "HEAD").read_bytes() == b'{"x":1}\n'


def test_checksum_covers_the_header_fields_too():
    data = bytearray(encode(Message(ACK, 3)))
    data[8] ^= 1  # the sequence number
    with pytest.raises(ProtocolError, match="checksum"):
        read_message(io.BytesIO(bytes(data)))
    assert zlib.crc32(b"") == 0 and os.sep == "/"


def test_append_only_keeps_the_emergency_recover_a_rewrite_replaces_and_skips_an_unchanged_one(tmp_path):
    name = "emergency.recover"

    def put(body: bytes, seq: int) -> List[Message]:
        return [Message(PUT, seq, {"path": name, "offset": 0}, body), Message(FINISH, seq + 1, {"path": name, "size": len(body)})]

    assert [m.type for m in session(tmp_path, [hello(), *put(b"first", 2)], append_only=True)] == [WELCOME, ACK, ACK]
    assert [m.type for m in session(tmp_path, [hello(), *put(b"first", 2)], append_only=True)] == [WELCOME, ACK, ACK]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(name)) == [name]
    assert [m.type for m in session(tmp_path, [hello(), *put(b"second", 2)], append_only=True)] == [WELCOME, ACK, ACK]
    kept = sorted(p for p in tmp_path.iterdir() if p.name.startswith(name + ".replaced-"))
    assert (tmp_path / name).read_bytes() == b"second" and [p.read_bytes() for p in kept] == [b"first"]


@pytest.mark.parametrize("append_only", [False, True])
def test_the_receiver_alone_decides_retention_and_append_only_deletes_nothing(tmp_path, append_only):
    seg = "gen-{:06d}/seg-000001.pbj"
    ops = [Message(APPEND, n + 1, {"path": seg.format(n), "offset": 0, "sync": True}, b"x") for n in (1, 2, 3, 4)]
    head = Message(HEAD, 6, {"generation": "gen-000004"}, b"{}\n")
    inp = io.BytesIO(b"".join(encode(m) for m in [hello(), *ops, head]))
    out = io.BytesIO()
    serve(inp, out, Tree(str(tmp_path), append_only, keep=2))
    gens = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("gen-"))
    assert gens == (["gen-000001", "gen-000002", "gen-000003", "gen-000004"] if append_only else ["gen-000003", "gen-000004"])
