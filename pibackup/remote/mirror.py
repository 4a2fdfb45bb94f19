"""What the receiver lacks of the local backup directory, and the messages that bring it there:
whole files (the marker, snapshots) put and finished, journal segments appended at the
offset the receiver holds, everything sealed with the key first when there is one.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from pibackup.copies.crypt import HEADER, NODE_ID_SIZE, Binding, Encryptor, Key
from pibackup.remote.link import Link, RemoteError
from pibackup.remote.protocol import APPEND, CHUNK_BYTES, FINISH, PUT
from pibackup.store import directory as dst
from pibackup.store.chain import Walk, walk_segment
from pibackup.store.layout import MARKER, TOP_FILES, generation_number

OpenSegment = Callable[[], Optional[Tuple[str, int]]]
BindingOf = Callable[[str], Binding]  # generation name -> the binding of its new files


@dataclass
class Held:
    """One file as the receiver holds it."""

    plain: int = 0  # bytes of the local file it holds
    size: int = 0  # bytes of the remote file (more than `plain` when encrypted)
    final: bool = False  # whole (put and finished), or encrypted and ended with its final chunk
    enc: Optional[Encryptor] = None  # encrypted: goes on with the same file id and chunk index
    chain: Optional[int] = None  # a plain segment as listed: its checksum chain's end, checked once against ours
    last: Optional[Tuple[str, int]] = None  # an encrypted one: its last chunk's SHA-256 and plaintext length, likewise
    restart: bool = False  # it differs from ours: the receiver sets it aside and it is sent again from 0


@dataclass
class LocalFile:
    rel: str
    path: str
    length: int  # bytes to hold remotely: a segment's valid part, a whole file's size
    closed: bool
    whole: bool  # sent whole through a temporary file: the marker, a snapshot


class Mirror:
    """The receiver's files as this sender knows them, and the sending of what is missing.
    Callers hold the sender's lock."""

    def __init__(self, source: str, key: Optional[Key], binding_of: BindingOf):
        self.source = source
        self.key = key
        self.binding_of = binding_of
        self.files: Dict[str, Held] = {}
        self.bytes_sent = 0
        self.restarted = 0  # segments found to differ and sent again
        self._walks: Dict[str, Walk] = {}
        self.top_sent: Dict[str, Tuple[int, int]] = {}  # top file -> (mtime_ns, size) sent in this process

    def load(self, listing: Dict[str, Dict[str, object]]) -> None:
        """What the receiver's WELCOME lists."""
        self.files = {}
        for rel, info in listing.items():
            h = Held(plain=int(info["plain"]), size=int(info["size"]), final=bool(info["final"]))  # type: ignore[call-overload]
            header = bytes.fromhex(str(info.get("header") or ""))
            if header:
                h.enc = self._continue(rel, header, int(info["chunks"]))  # type: ignore[call-overload]
                if rel.endswith(".pbj") and h.enc.index and not h.final:
                    h.last = (str(info.get("last") or ""), int(info.get("last_plain") or 0))  # type: ignore[call-overload]
            elif self.key is not None and rel != MARKER and h.plain:
                raise RemoteError(f"{rel} is not encrypted in the remote copy, but a key is set: give the remote a new directory")
            elif rel.endswith(".pbj") and h.plain:
                h.chain = int(info.get("chain") or 0)  # type: ignore[call-overload]
            self.files[rel] = h

    def _continue(self, rel: str, header: bytes, chunks: int) -> Encryptor:
        if self.key is None:
            raise RemoteError(f"{rel} is encrypted in the remote copy, but no key is set (pibackup-remote-encrypt-key)")
        _, _, _, _, kid, file_id = HEADER.unpack(header[: HEADER.size])
        if kid != self.key.key_id:
            raise RemoteError(
                f"{rel} in the remote copy was encrypted with another key (key id {kid.hex()}); give the remote a new directory"
            )
        rest = header[HEADER.size :]
        binding = Binding(rest[:16], rest[16 : 16 + NODE_ID_SIZE]) if len(rest) >= 16 + NODE_ID_SIZE else None
        enc = Encryptor(self.key, rel, file_id, chunks, binding=binding)
        if enc.header != header:
            raise RemoteError(f"{rel} in the remote copy has a header this pibackup would not write; give the remote a new directory")
        return enc

    # --- the local side ------------------------------------------------------------------
    def inventory(self, open_segment: OpenSegment) -> List[LocalFile]:
        """The marker and the generations to hold remotely: from the newest one the receiver
        holds (or the newest local one) on, each snapshot before its segments."""
        gens = dst.Destination(self.source).generations()
        seg = open_segment()  # after listing: a segment closed meanwhile counts as closed
        held = [generation_number(rel.split("/")[0]) or 0 for rel in self.files if "/" in rel]
        since = max(held) if held else (gens[-1].number if gens else 0)
        out = [LocalFile(MARKER, os.path.join(self.source, MARKER), -1, True, True)]
        for name in TOP_FILES:  # NODE, emergency.recover: rewritten whole, sent whole when changed
            path = os.path.join(self.source, name)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            if self.top_sent.get(name) != (st.st_mtime_ns, st.st_size):
                self.files.pop(name, None)
            out.append(LocalFile(name, path, -1, True, True))
        open_path = os.path.normpath(seg[0]) if seg is not None else None
        for g in gens:
            if g.number < since:
                continue
            for p in g.snapshots:
                out.append(LocalFile(os.path.relpath(p, self.source), p, -1, True, True))
            for p in g.segments:
                rel = os.path.relpath(p, self.source)
                if seg is not None and os.path.normpath(p) == open_path:
                    out.append(LocalFile(rel, p, seg[1], False, False))
                else:
                    out.append(LocalFile(rel, p, -1, True, False))
        return out

    # --- sending ----------------------------------------------------------------------------
    def send(self, link: Link, files: List[LocalFile], whole_files: bool) -> Optional[str]:
        """Send what the receiver lacks of `files`, in order. With `whole_files` False (the
        hook's path) it stops before the first whole file and returns its name."""
        for f in files:
            h = self.files.get(f.rel)
            if f.whole:
                if h is not None and h.final:
                    continue
                if not whole_files and f.rel in TOP_FILES:
                    continue  # not the journal: the background round sends it, the hook never waits for it
                if not whole_files:
                    return f.rel
                self._put(link, f)
                continue
            self._append(link, f, self._valid(f, advance=whole_files), sync=False)
        return None

    def _valid(self, f: LocalFile, advance: bool) -> int:
        """A segment's valid length: the open one's as its writer says; a closed one's by
        following its checksum chain, because it may still end in zeros written ahead, which
        are not sent (the walk goes on from where the background rounds left the open one)."""
        w = self._walks.get(f.rel)
        if w is None:
            w = self._walks[f.rel] = Walk(f.path)
        if f.length >= 0:
            if advance:  # the background thread's rounds, never the hook: a roll-over then walks little
                walk_segment(w, f.length)
            return f.length
        walk_segment(w, os.path.getsize(f.path))
        self._walks.pop(f.rel)
        return w.offset

    def continues(self, path: str, open_rel: Optional[str]) -> bool:
        """Is `path` the open segment the receiver already holds a part of?"""
        return open_rel is not None and open_rel in self.files and os.path.relpath(path, self.source) == open_rel

    def holds(self, path: str, length: int) -> bool:
        h = self.files.get(os.path.relpath(path, self.source))
        return h is not None and h.plain == length

    def early(self, link: Link, path: str, offset: int, data: bytes, open_rel: Optional[str]) -> bool:
        """Send a flush's bytes before the local sync, when they continue exactly what the
        receiver holds of the open segment; True when sent."""
        rel = os.path.relpath(path, self.source)
        h = self.files.get(rel)
        if rel != open_rel or h is None or h.chain is not None or h.last is not None or h.plain != offset or h.final:
            return False
        self._send_piece(link, rel, h, data, final=False, sync=True)
        return True

    def append_open(self, link: Link, path: str, length: int, sync: bool) -> Optional[int]:
        """The open segment's new bytes in one APPEND, synced by the receiver when `sync`;
        the sequence number to wait for (None when not `sync`)."""
        rel = os.path.relpath(path, self.source)
        h = self.files[rel]
        if h.plain < length:
            self._append(link, LocalFile(rel, path, length, False, False), length, sync=sync)
        elif sync:
            link.send(APPEND, {"path": rel, "offset": h.size, "sync": True})
        return link.sent if sync else None

    def sync_last(self, link: Link, files: List[LocalFile]) -> None:
        """An empty synced append to the newest segment: the receiver syncs it before its ack."""
        segs = [f for f in files if not f.whole]
        if segs:
            f = segs[-1]
            h = self.files.setdefault(f.rel, Held())
            link.send(APPEND, {"path": f.rel, "offset": h.size, "sync": True})

    def _append(self, link: Link, f: LocalFile, length: int, sync: bool) -> None:
        h = self.files.get(f.rel)
        if h is None:
            h = self.files[f.rel] = Held()
            if self.key is not None:
                h.enc = Encryptor(self.key, f.rel, binding=self.binding_of(f.rel.split("/")[0]))
        if h.final:
            return
        if h.chain is not None or h.last is not None or h.plain > length:
            h = self._checked(f, h, length)
        with open(f.path, "rb") as src:
            while h.plain < length or (f.closed and h.enc is not None and not h.final):
                src.seek(h.plain)
                piece = src.read(min(CHUNK_BYTES, length - h.plain))
                if len(piece) < min(CHUNK_BYTES, length - h.plain):
                    raise RemoteError(f"{f.path} is shorter than the backup said ({h.plain + len(piece)} < {length} bytes)")
                last = h.plain + len(piece) >= length
                self._send_piece(link, f.rel, h, piece, final=f.closed and last, sync=sync and last)
        if f.closed and h.enc is None:
            h.final = True

    def _checked(self, f: LocalFile, h: Held, length: int) -> Held:
        """A segment the receiver held before this session must be a prefix of ours: frames
        sent while the local sync ran (Mirror's early sends) may be lost here by a crash, and
        the journal then goes on differently. A copy that differs, or is longer, is set aside
        by the receiver (kept, never read) and sent again."""
        same = h.plain <= length
        if same and h.chain is not None and h.enc is None:
            w = walk_segment(Walk(f.path), h.plain)
            same = w.offset == h.plain and w.checksum == h.chain
        if same and h.last is not None and h.enc is not None:
            # Only the last chunk can hold what the stick lost: flushes are synced in turn,
            # so every earlier one was durable here before the next was sent. Encrypting
            # our own bytes at its place again (same file, index, flags) must give it back.
            digest, plain_len = h.last
            with open(f.path, "rb") as src:
                src.seek(h.plain - plain_len)
                ours = src.read(plain_len)
            again = Encryptor(h.enc.key, f.rel, h.enc.file_id, h.enc.index - 1, binding=self._binding_of_header(h.enc))
            same = len(ours) == plain_len and hashlib.sha256(again.chunk(ours)).hexdigest() == digest
        if same:
            h.chain = h.last = None
            return h
        fresh = self.files[f.rel] = Held(restart=True)
        if self.key is not None:
            fresh.enc = Encryptor(self.key, f.rel, binding=self.binding_of(f.rel.split("/")[0]))
        self.restarted += 1
        return fresh

    @staticmethod
    def _binding_of_header(enc: Encryptor) -> Optional[Binding]:
        rest = enc.header[HEADER.size :]
        return Binding(rest[:16], rest[16 : 16 + NODE_ID_SIZE]) if len(rest) >= 16 + NODE_ID_SIZE else None

    def _send_piece(self, link: Link, rel: str, h: Held, piece: bytes, final: bool, sync: bool) -> None:
        data = piece
        if h.enc is not None:
            data = (h.enc.header if h.size == 0 else b"") + h.enc.chunks(piece, final=final)
        meta = {"path": rel, "offset": h.size, "sync": sync}
        if h.restart:
            meta["restart"], h.restart = True, False
        link.send(APPEND, meta, data)
        h.size += len(data)
        h.plain += len(piece)
        h.final = final
        self.bytes_sent += len(data)

    def _put(self, link: Link, f: LocalFile) -> None:
        enc = None
        if self.key is not None and f.rel != MARKER:  # the marker is never encrypted (as shipped)
            enc = Encryptor(self.key, f.rel, binding=self.binding_of(f.rel.split("/")[0]))
        sent = 0
        with open(f.path, "rb") as src:
            st = os.fstat(src.fileno())
            size = st.st_size
            pos = 0
            first = True
            while first or pos < size:
                piece = src.read(CHUNK_BYTES)
                pos += len(piece)
                data = piece if enc is None else (enc.header if first else b"") + enc.chunks(piece, final=pos >= size)
                link.send(PUT, {"path": f.rel, "offset": sent}, data)
                sent += len(data)
                first = False
        link.send(FINISH, {"path": f.rel, "size": sent})
        self.files[f.rel] = Held(plain=size, size=sent, final=True)
        if f.rel in TOP_FILES:
            self.top_sent[f.rel] = (st.st_mtime_ns, size)
        self.bytes_sent += sent
