"""Where lightningd's database is, found without asking lightningd (no RPC during init).

Order: the pibackup-live-db option, lightningd's own `wallet=` (command line, then its
config files), then the default lightningd.sqlite3 in the network directory.
"""

from __future__ import annotations

import os
from typing import Iterable, List, Optional

from pibackup.errors import PibackupError

DEFAULT_NAME = "lightningd.sqlite3"


class LiveDbError(PibackupError):
    pass


def parse_wallet(value: str, base_dir: str) -> str:
    """The main database path from a `wallet=` DSN (sqlite3://main[:backup]) or a plain path."""
    v = value.strip()
    if v.startswith(("postgres://", "postgresql://")):
        raise LiveDbError(
            "lightningd uses a PostgreSQL wallet; pibackup backs up the sqlite3 wallet only. "
            "Use PostgreSQL's own replication instead, and remove pibackup from the config"
        )
    if v.startswith("sqlite3://"):
        v = v[len("sqlite3://") :].split(":", 1)[0]
    elif "://" in v:
        raise LiveDbError(f"unknown wallet DSN {value!r}: pibackup understands sqlite3://PATH only")
    if not v:
        raise LiveDbError(f"empty database path in {value!r}")
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(v)))


def _wallet_in_args(args: List[str]) -> tuple[Optional[str], Optional[str]]:
    wallet = conf = None
    for i, a in enumerate(args):
        for name in ("wallet", "conf"):
            flag = "--" + name
            val = None
            if a.startswith(flag + "="):
                val = a[len(flag) + 1 :]
            elif a == flag and i + 1 < len(args):
                val = args[i + 1]
            if val is not None:
                if name == "wallet":
                    wallet = val
                else:
                    conf = val
    return wallet, conf


def _wallet_in_config(paths: Iterable[str]) -> Optional[str]:
    found = None
    for p in paths:
        try:
            with open(p, encoding="utf-8", errors="replace") as f:
                for line in f:
                    line = line.strip()
                    if line.startswith("wallet="):
                        found = line[len("wallet=") :]
        except OSError:
            continue
    return found


def lightningd_args() -> List[str]:
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]


def find_live_db(option: Optional[str], lightning_dir: str, parent_args: Optional[List[str]] = None) -> str:
    """Path of lightningd's sqlite3 database. `lightning_dir` is the network directory."""
    if option:
        path = parse_wallet(option, lightning_dir)
    else:
        args = lightningd_args() if parent_args is None else parent_args
        wallet, conf = _wallet_in_args(args)
        if wallet is None:
            top = os.path.dirname(os.path.normpath(lightning_dir))
            configs = [conf] if conf else [os.path.join(top, "config"), os.path.join(lightning_dir, "config")]
            wallet = _wallet_in_config(configs)
        path = parse_wallet(wallet, lightning_dir) if wallet else os.path.join(lightning_dir, DEFAULT_NAME)
    if not os.path.isfile(path):
        raise LiveDbError(
            f"lightningd's database {path} not found; if it lives elsewhere, set pibackup-live-db=/path/to/lightningd.sqlite3"
        )
    with open(path, "rb") as f:
        if f.read(16) != b"SQLite format 3\0":
            raise LiveDbError(f"{path} is not an sqlite3 database; set pibackup-live-db to lightningd's database")
    return path
