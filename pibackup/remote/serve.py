"""`pibackup serve [--append-only] [--keep N] DIR`: the receiver, started by the plugin through
ssh, answering the protocol's messages on stdin/stdout and keeping DIR a restorable copy.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
from typing import BinaryIO, List, Optional

from pibackup import __version__
from pibackup.errors import PibackupError
from pibackup.remote.protocol import (
    ACK,
    APPEND,
    BYE,
    ERROR,
    FINISH,
    HEAD,
    HELLO,
    PROTOCOL_VERSION,
    PUT,
    WELCOME,
    Message,
    PeerClosed,
    ProtocolError,
    encode,
    read_message,
)
from pibackup.remote.tree import Refused, Tree

KEEP_DEFAULT = 3  # generations kept on the remote host (the newest and two before it)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pibackup serve",
        description="Receive a node's backup from its pibackup plugin over ssh (stdin/stdout) and keep it in DIR. "
        "Started by the plugin (pibackup-remote), not by hand.",
    )
    p.add_argument("--append-only", action="store_true", help="never delete or rewrite anything acknowledged (no retention)")
    p.add_argument("--keep", type=int, default=KEEP_DEFAULT, help=f"generations kept (default {KEEP_DEFAULT}; 0: all)")
    p.add_argument("directory", metavar="DIR", help="the directory of this node's copy")
    return p


def explain(e: OSError, root: str) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the remote host is out of space in {root}: free space there"
    if e.errno == errno.EROFS:
        return f"{root} on the remote host is read-only"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"no permission to write in {root} on the remote host: fix its owner or permissions"
    return f"{e.filename or root}: {e.strerror} on the remote host"


class Server:
    def __init__(self, tree: Tree, out: BinaryIO):
        self.tree = tree
        self.out = out
        self.greeted = False

    def reply(self, msg: Message) -> None:
        self.out.write(encode(msg))
        self.out.flush()

    def handle(self, m: Message) -> bool:
        """Answer one message; False when the session is over."""
        if m.type == BYE:
            self.reply(Message(ACK, m.seq))
            return False
        if m.type == HELLO:
            theirs = m.meta.get("protocol")
            if theirs != PROTOCOL_VERSION:
                raise Refused(
                    f"protocol version mismatch: the sender speaks {theirs}, this receiver (pibackup {__version__}) speaks "
                    f"{PROTOCOL_VERSION}; install the same pibackup release on both hosts"
                )
            listing = self.tree.hello(m.meta)
            self.greeted = True
            self.reply(Message(WELCOME, m.seq, {"protocol": PROTOCOL_VERSION, "version": __version__, **listing}))
            return True
        if not self.greeted:
            raise Refused("the first message must be HELLO")
        t = self.tree
        if m.type == APPEND:
            t.append(m.meta.get("path"), m.meta.get("offset"), m.data, bool(m.meta.get("sync")), bool(m.meta.get("restart")))
        elif m.type == PUT:
            t.put(m.meta.get("path"), m.meta.get("offset"), m.data)
        elif m.type == FINISH:
            t.finish(m.meta.get("path"), m.meta.get("size"))
        elif m.type == HEAD:
            t.head(m.data, m.meta.get("generation"))
        else:
            raise Refused(f"{m.name} is not something a sender sends")
        self.reply(Message(ACK, m.seq))
        return True


def serve(inp: BinaryIO, out: BinaryIO, tree: Tree) -> int:
    """Until BYE, the end of the stream, or the first error: an error is answered (ERROR, with
    what went wrong) and ends the session, since what follows it may depend on it."""
    server = Server(tree, out)
    seq = 0
    try:
        while True:
            try:
                m = read_message(inp)
            except PeerClosed:
                return 0
            seq = m.seq
            if not server.handle(m):
                return 0
    except ProtocolError as e:
        _error(server, seq, f"the receiver got a broken message ({e})")
        return 1
    except Refused as e:
        _error(server, seq, str(e))
        return 1
    except OSError as e:
        _error(server, seq, explain(e, tree.root))
        return 1
    finally:
        tree.close()


def _error(server: Server, seq: int, text: str) -> None:
    print(f"pibackup serve: {text}", file=sys.stderr)
    try:
        server.reply(Message(ERROR, seq, {"error": text}))
    except OSError:
        pass


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # the sender gone: end quietly
    root = args.directory
    if not os.path.isabs(root):
        root = os.path.join(os.path.expanduser("~"), root)
    try:
        os.makedirs(root, mode=0o700, exist_ok=True)
    except OSError as e:
        err = f"cannot create {root}: {e.strerror}"
        _error(Server(Tree(root, args.append_only, args.keep), sys.stdout.buffer), 0, err)
        return 1
    try:
        return serve(sys.stdin.buffer, sys.stdout.buffer, Tree(root, args.append_only, args.keep))
    except PibackupError as e:
        print(f"pibackup serve: {e}", file=sys.stderr)
        return 1
