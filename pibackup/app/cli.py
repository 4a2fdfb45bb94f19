"""The `pibackup` command line: restore, verify and check a backup directory and its medium.

Messages and exit codes are for a person at a Pi's terminal: 0 ok, 1 failed or damaged, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import sys
from types import FrameType
from typing import Any, Callable, List, Optional

from pibackup import __version__
from pibackup.app import stickcheck
from pibackup.app.config import SHIP_PORT_DEFAULT, ConfigError, _int
from pibackup.app.modes import RestoreArgs, detect
from pibackup.copies.crypt import key_id, write_key_file
from pibackup.copies.fetch import MAX_FILE_DEFAULT
from pibackup.copies.rclone_target import check_config_file
from pibackup.copies.readable import CopyReport, Terminated, older_than_records, readable_copy
from pibackup.copies.target import ShipError, check_local_file
from pibackup.errors import PibackupError
from pibackup.node import restore as node_restore
from pibackup.store.access import refuse_foreign
from pibackup.store.output import check_output
from pibackup.store.replay import Outcome

BACKUP_HELP = "the pibackup-destination directory, a copy, [user@]host:/path or rclone:REMOTE:path"

def _checked(check: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type from one of the plugin's own option checks: the same rules for the
    same values, and a wrong one is a usage error before anything runs."""

    def parse(value: str) -> Any:
        try:
            return check(value)
        except PibackupError as e:
            raise argparse.ArgumentTypeError(str(e)) from e

    return parse


def _ssh_file(option: str) -> Callable[[str], Any]:
    def check(value: str) -> str:
        if value.startswith("-"):
            raise ShipError(f"{option}={value!r} is not a file name (ssh would read it as an option)")
        return check_local_file(option, os.path.abspath(os.path.expanduser(value)))

    return _checked(check)


def _port(value: str) -> int:
    """The plugin's pibackup-ship-port rule, told in the command line's words."""
    try:
        return _int({"pibackup-ship-port": value}, "pibackup-ship-port")
    except ConfigError as e:
        raise ShipError(str(e).replace("pibackup-ship-port", "--ssh-port")) from e


def _max_file_mb(value: str) -> int:
    if not value.isdigit() or not 1 <= int(value) <= 1 << 30:
        raise ShipError(f"--max-file-mb={value!r}: give a whole number of MiB, at least 1 (default {MAX_FILE_DEFAULT >> 20})")
    return int(value) << 20


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pibackup",
        description="Restore or check a pibackup backup of Core Lightning's database. BACKUP_DIR is the "
        "pibackup-destination directory, a copy of it, or a remote copy made by pibackup-ship: [user@]host:/path.",
        epilog="Exit status: 0 success, 1 failure or damage found, 2 wrong usage.",
    )
    p.add_argument("--version", action="version", version=f"pibackup {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    r = sub.add_parser(
        "restore",
        help="rebuild lightningd.sqlite3 from a backup directory",
        description="Rebuild a database from the newest generation: its snapshot, then every journalled "
        "transaction in order. Writes OUTPUT_DB.pibackup-tmp, syncs it, then renames it.",
    )
    r.add_argument("backup_dir", metavar="BACKUP_DIR", help=BACKUP_HELP)
    r.add_argument(
        "output", metavar="OUTPUT_DB", nargs="?", help="database file to create, e.g. ~/.lightning/bitcoin/lightningd.sqlite3"
    )
    r.add_argument(
        "--lightning-dir",
        metavar="DIR",
        help="restore the node instead of one file: the database and emergency.recover into DIR/<network>/, "
        "checked against the network and the hsm_secret there (docs/guide/recovery.md)",
    )
    r.add_argument("--network", metavar="NAME", help="with --lightning-dir: the node's network (default: the one its database names)")
    r.add_argument("--force", action="store_true", help="replace OUTPUT_DB if it exists (stop lightningd first!)")
    r.add_argument("--generation", type=int, metavar="N", help="restore generation N instead of the newest")
    r.add_argument(
        "--partial",
        action="store_true",
        help="if the journal is damaged in the middle, restore up to the last good transaction instead of failing",
    )
    v = sub.add_parser(
        "verify",
        help="read and check everything in a backup directory",
        description="Check every snapshot and journal frame; print generations, data_version ranges and damage "
        "(and a note on a generation the plugin found damaged while it ran).",
    )
    v.add_argument("backup_dir", metavar="BACKUP_DIR", help=BACKUP_HELP)
    for sp in (r, v):
        g = sp.add_argument_group("shipped copies (pibackup-ship)")
        g.add_argument("--key", metavar="FILE", help="the pibackup-ship-encrypt-key file, for an encrypted copy")
        g.add_argument(
            "--ssh-port", type=_checked(_port), default=SHIP_PORT_DEFAULT, metavar="N", help="ssh port of the remote host (default 22)"
        )
        g.add_argument("--ssh-identity", type=_ssh_file("--ssh-identity"), metavar="FILE", help="ssh private key for the remote host")
        g.add_argument(
            "--known-hosts", type=_ssh_file("--known-hosts"), metavar="FILE", help="known_hosts file with the remote host's key"
        )
        g.add_argument(
            "--rclone-config",
            type=_checked(lambda v: check_config_file("--rclone-config", os.path.abspath(os.path.expanduser(v)))),
            metavar="FILE",
            help="rclone's config file for an rclone:REMOTE:path copy (default: rclone's own)",
        )
        g.add_argument(
            "--max-file-mb",
            type=_checked(_max_file_mb),
            default=MAX_FILE_DEFAULT,
            metavar="N",
            help=f"fetch no file larger than this (default {MAX_FILE_DEFAULT >> 20}): a copy is never larger than its "
            "database and journal segments",
        )
    k = sub.add_parser(
        "keygen",
        help="create a key file for pibackup-ship-encrypt-key",
        description="Write a new random 256-bit key to FILE (mode 600; never overwrites). Keep a copy away from "
        "the Pi and the remote host: without it an encrypted remote copy cannot be restored.",
    )
    k.add_argument("key_file", metavar="FILE")
    s = sub.add_parser(
        "status",
        help="show a backup directory's state without lightningd",
        description="Generations, newest data_version, last write, size and free space of a backup directory, "
        "and whether a running pibackup is writing it. Reads only the newest segment; `verify` reads everything.",
    )
    s.add_argument("backup_dir", metavar="BACKUP_DIR")
    s.add_argument("--json", action="store_true", help="print JSON")
    c = sub.add_parser(
        "check",
        help="check the medium under a directory before trusting it with the backup",
        description="File system and mount options, fstab's nofail, whether it is the medium the live database is on, "
        "free space, and the sync latency of a few dozen 4 KiB writes in a temporary file beside DIR on the same file "
        "system, or in DIR (removed after). "
        "Exit status 1 when there is a warning.",
    )
    c.add_argument("directory", metavar="DIR")
    c.add_argument("--live-db", metavar="PATH", help="lightningd's database (default: looked for in the usual places)")
    c.add_argument("--json", action="store_true", help="print JSON")
    return p


def _terminate(signum: int, frame: Optional[FrameType]) -> None:
    # Once: the unwinding that follows (removing temporary copies) is not cut short again.
    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)
    raise Terminated(signal.Signals(signum).name)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # the receiver of pibackup-remote, on the other host
        from pibackup.remote.serve import main as serve

        return serve(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "restore" and (args.output is None) == (args.lightning_dir is None):
        parser.error("restore: give OUTPUT_DB, or --lightning-dir DIR to restore the whole node (not both)")
    if args.command == "restore" and args.network is not None and args.lightning_dir is None:
        parser.error("restore: --network goes with --lightning-dir")
    # Decrypted copies must not outlive an interrupted run: SIGTERM (systemd, kill) and SIGHUP
    # (a closed terminal) unwind like Ctrl-C, through every `finally`.
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _terminate)
    try:
        if args.command == "restore":
            return _restore(args)
        if args.command == "status":
            return _status(args)
        if args.command == "keygen":
            return _keygen(args)
        if args.command == "check":
            return stickcheck.command(args.directory, args.live_db, args.json)
        return _verify(args)
    except PibackupError as e:
        print(f"pibackup: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"pibackup: error: {e.filename or ''}: {e.strerror}", file=sys.stderr)
        return 1
    except sqlite3.Error as e:
        print(f"pibackup: error: SQLite: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Terminated) as e:
        print(f"pibackup: stopped ({e or 'SIGINT'}); temporary files removed, nothing written", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 143


def _progress(out: Outcome, fraction: float, rate: float) -> None:
    sys.stderr.write(
        f"\rrestoring {out.generation}: {min(99, int(100 * fraction))}%, {out.transactions:,} transactions, {rate:,.0f}/s   "
    )
    sys.stderr.flush()


def _restore(args: argparse.Namespace) -> int:
    if args.lightning_dir is None:
        return _restore_to(args, args.output, None)
    with node_restore.prepare(args.lightning_dir, args.network, args.force) as node:
        return _restore_to(args, node.staged_db, node)


def _restore_to(args: argparse.Namespace, output: str, node: Optional[node_restore.NodeTarget]) -> int:
    tty = sys.stderr.isatty()  # progress for a person at a terminal, nothing in scripts and logs
    check_output(output, args.force and node is None)  # before fetching anything
    copy = readable_copy(
        args.backup_dir, output, args.key, args.ssh_port, args.ssh_identity, args.known_hosts, args.max_file_mb, args.rclone_config
    )
    with copy as report:
        src = report.root
        _copy_notes(report)
        _access_warnings(src)
        what = RestoreArgs(args.force and node is None, args.generation, args.partial, _progress if tty else None)
        out = detect(src).restore(src, output, what)
        if node is not None:
            if out.checks_copy and older_than_records(report) is not None:
                _copy_warnings(report, restoring=True)
                raise node_restore.NodeRestoreError("this copy is older than its own records: nothing was written")
            out.lines = [line.replace(output, "the node's database") for line in out.lines] + node.place(src)
            out.notes += node.notes
            out.warnings += node.warnings
    if tty:
        sys.stderr.write("\r" + " " * 78 + "\r")
    for note in out.notes:
        print(f"pibackup: note: {note}", file=sys.stderr)
    for warning in out.warnings:
        print(f"pibackup: WARNING: {warning}", file=sys.stderr)
    for line in out.lines:
        print(line)
    if "utxoset" in out.filtered_tables:
        print(rescan_advice(out.rescan_from))
    older = out.checks_copy and _copy_warnings(report, restoring=True)
    return 1 if out.damaged or older else 0


def _copy_notes(report: CopyReport) -> None:
    for note in report.notes:
        print(f"pibackup: note: {note}", file=sys.stderr)


def _copy_warnings(report: CopyReport, restoring: bool) -> bool:
    """When the copy's newest transaction was written, and, loudly, whether it holds less
    than its own head record says. True when it does (exit status 1)."""
    if report.newest:
        print(report.newest)
    for doubt in report.doubts:
        print(f"pibackup: WARNING: {doubt}", file=sys.stderr)
    older = older_than_records(report)
    if older is None:
        return False
    print(f"pibackup: WARNING: {older}", file=sys.stderr)
    print(
        "pibackup: WARNING: it was cut back by the host, or damaged there. "
        + (
            "Do NOT start lightningd on this database while a newer state may exist: an old channel state can "
            "cost the channels' funds. Restore from the backup medium or another copy."
            if restoring
            else "Do not rely on it: check the backup medium and the host."
        ),
        file=sys.stderr,
    )
    return True


def rescan_advice(height: Optional[int]) -> str:
    """What a node restored without its utxoset rows needs (README: Filtering)."""
    start = f"--rescan=-{height}" if height is not None else "--rescan=-<height of your oldest channel>"
    return (
        "note: this backup leaves out the rows of utxoset (pibackup-filter-tables), lightningd's cache of "
        "on-chain P2WSH outputs used to check gossip. Channels, HTLCs, funds and payments are all restored "
        "and the node runs without it. To rebuild it as it was, start lightningd once with "
        f"{start} (it reprocesses every block from that height; bitcoind must still have them, "
        "so not a pruned node); otherwise gossip about channels announced before the restore is "
        "checked less strictly until they age out."
    )


def _access_warnings(backup_dir: str) -> None:
    """Refuse a backup holding another user's files; say who else can change it."""
    for w in refuse_foreign(backup_dir):
        print(f"pibackup: WARNING: {w}", file=sys.stderr)


def _status(args: argparse.Namespace) -> int:
    _access_warnings(args.backup_dir)
    st = detect(args.backup_dir).offline_status(args.backup_dir)
    if args.json and st.data is not None:
        print(json.dumps(st.data, indent=2))
        return 0
    for line in st.lines:
        print(line)
    return 1 if st.failed else 0


def _keygen(args: argparse.Namespace) -> int:
    key = write_key_file(args.key_file)
    print(f"wrote {args.key_file} (key id {key_id(key.secret).hex()})")
    print("Now copy it somewhere safe away from this Pi and from the remote host: without it the encrypted")
    print(f"copy cannot be restored. Then add to lightningd's config: pibackup-ship-encrypt-key={os.path.abspath(args.key_file)}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    copy = readable_copy(
        args.backup_dir, None, args.key, args.ssh_port, args.ssh_identity, args.known_hosts, args.max_file_mb, args.rclone_config
    )
    with copy as report:
        src = report.root
        _copy_notes(report)
        _access_warnings(src)
        rep = detect(src).verify(src)
        for line in rep.lines:
            print(line)
        older = rep.checks_copy and _copy_warnings(report, restoring=False)
    print("DAMAGE FOUND" if rep.damaged else "OLDER THAN ITS RECORDS" if older else "ok")
    return 1 if rep.damaged or older else 0
