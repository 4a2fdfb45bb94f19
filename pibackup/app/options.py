"""Every `pibackup-*` option in one table: name, default, accepted values, help text.

plugin.py registers the options from it, config.py takes defaults and ranges from it, and
`python -m pibackup.app.options` writes docs/guide/options.md from it (`make docs`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

from pibackup.rules.filter import DEFAULT_FILTER, FILTERABLE

SEGMENT_MIN = 64 * 1024
SEGMENT_MAX = 1024 * 1024 * 1024  # well under FAT32's 4 GiB file limit
COMPACT_RATIO_MIN = 0.05
COMPACT_RATIO_MAX = 100.0
MODES = ("journal", "replica")
DESTINATION_FAILURE_POLICIES = ("halt", "continue-degraded")


@dataclass(frozen=True)
class Option:
    name: str
    default: Union[str, int, None]  # what lightningd is told, and what config.py assumes when unset
    help: str  # lightningd's help text for the option, and the docs' "meaning"
    values: str  # what config.py accepts, in words, for the docs
    guide: str  # the user-guide page (docs/guide/) that explains the option
    opt_type: str = "string"  # pyln-client's type: string or int
    multi: bool = False
    low: Optional[int] = None  # int options: the range config.py accepts
    high: Optional[int] = None
    unit: str = ""  # int options: the unit in config.py's messages
    shown_default: Optional[str] = None  # the docs' default column, where `default` says nothing


def _int(name: str, default: int, low: int, high: int, unit: str, help: str, guide: str) -> Option:
    return Option(name, default, help, f"{low} to {high} {unit}", guide, opt_type="int", low=low, high=high, unit=unit)


OPTIONS: Tuple[Option, ...] = (
    Option(
        "pibackup-destination",
        None,
        "Absolute path of an empty directory on the backup medium (USB stick, second SD card), e.g. /media/usb/pibackup. "
        "Required. Give it more than once to keep a full backup on each medium.",
        "an absolute path; given twice or more: one full backup in each (journal mode only)",
        "destinations.md",
        multi=True,
        shown_default="(required)",
    ),
    Option(
        "pibackup-on-destination-failure",
        "halt",
        "With several destinations, when one fails: halt (stop lightningd, as with one) or continue-degraded "
        "(go on with the others and warn; it rejoins when usable again).",
        " or ".join(DESTINATION_FAILURE_POLICIES),
        "destinations.md",
    ),
    Option(
        "pibackup-live-db",
        None,
        "lightningd's database, if pibackup cannot find it by itself: a path or the sqlite3:// DSN "
        "given to wallet=. Default: wallet= from lightningd's command line or config, else "
        "lightningd.sqlite3 in the network directory.",
        "a path, or a sqlite3:// DSN",
        "install.md",
        shown_default="found by itself",
    ),
    Option(
        "pibackup-filter-tables",
        ",".join(DEFAULT_FILTER),
        "Comma-separated tables whose rows are not backed up because lightningd rebuilds them from the "
        "chain (schema is kept), or 'none'. Only " + ", ".join(sorted(FILTERABLE)) + " can be filtered.",
        ", ".join(sorted(FILTERABLE)) + ", or none",
        "tiers-and-filtering.md",
    ),
    _int(
        "pibackup-batch-seconds", 30, 0, 3600, "seconds",
        "Chain-bookkeeping transactions (blocks, utxoset) may wait this long in memory before they are "
        "written; channel state is always written and synced before lightningd commits. 0: sync every one.",
        "tiers-and-filtering.md",
    ),
    _int(
        "pibackup-batch-kb", 256, 1, 16 * 1024, "KiB",
        "Write waiting chain-bookkeeping transactions once they reach this many KiB.",
        "tiers-and-filtering.md",
    ),
    _int(
        "pibackup-preallocate-kb", 1024, 0, 64 * 1024, "KiB",  # make bench: 2-3x fewer device bytes per sync on ext4
        "Extend journal segments with zeros this many KiB at a time, so that an append does not change "
        "the file's size (fewer metadata writes per sync); at most 1/16 of the snapshot's size. 0: off.",
        "wear.md",
    ),
    Option(
        "pibackup-led",
        "none",
        "A board LED to show the backup's health: heartbeat when fine, fast blink on a warning, steady on "
        "when the backup failed. ACT on current Raspberry Pis, led0 on older ones; none for no LED.",
        "an LED's name (no /), or none",
        "status.md",
    ),
    Option(
        "pibackup-led-dir",
        "/sys/class/leds",
        "Where the LEDs are (sysfs).",
        "a directory",
        "status.md",
    ),
    _int(
        "pibackup-min-free-mb", 100, 0, 1 << 20, "MiB",
        "Warn (log, systemd status, LED) when the backup medium has less free space than this.",
        "status.md",
    ),
    Option(
        "pibackup-segment-size",
        "32M",
        "Size at which a journal segment file is closed and a new one begun: 64K to 1G.",
        "a size such as 512K, 32M or 1G (binary units), 64K to 1G",
        "wear.md",
    ),
    Option(
        "pibackup-ship",
        None,
        "Also keep a copy elsewhere, sent in the background: [user@]host:/path with rsync over ssh, or "
        "rclone:REMOTE:path with rclone to a remote of its config (a cloud or object store). A directory of its "
        "own. Off when not set.",
        "[user@]host:/path, rclone:REMOTE:path, or none",
        "shipping.md",
        shown_default="off",
    ),
    _int("pibackup-ship-port", 22, 1, 65535, "(a TCP port)", "The ssh port of the pibackup-ship host.", "shipping.md"),
    Option(
        "pibackup-ship-identity",
        None,
        "The ssh private key to log in with (absolute path). Default: ssh's own (~/.ssh/id_* of lightningd's user).",
        "an absolute path to a readable file",
        "shipping.md",
        shown_default="ssh's own",
    ),
    Option(
        "pibackup-ship-known-hosts",
        None,
        "The known_hosts file holding the ship host's key (ssh never accepts an unknown key). "
        "Default: ~/.ssh/known_hosts of lightningd's user.",
        "an absolute path to a readable file",
        "shipping.md",
        shown_default="~/.ssh/known_hosts",
    ),
    _int(
        "pibackup-ship-interval", 60, 1, 86400, "seconds",  # a remote copy at most a minute behind; one ssh login a minute
        "Seconds between shipping rounds: the remote copy is at most this far behind.",
        "shipping.md",
    ),
    _int(
        "pibackup-ship-warn-after", 900, 1, 7 * 86400, "seconds",  # 15 min: a few missed rounds (a router reboot) stay quiet
        "Warn (log, systemd status, LED) when the remote copy has been behind this many seconds.",
        "shipping.md",
    ),
    Option(
        "pibackup-ship-encrypt-key",
        None,
        "Encrypt everything shipped with this key file (create it with: pibackup keygen FILE, and keep a "
        "copy away from the Pi). The remote host can then neither read nor undetectably alter the copy.",
        "an absolute path to a key file of mode 600",
        "encryption.md",
        shown_default="off",
    ),
    Option(
        "pibackup-ship-rclone-config",
        None,
        "The rclone config file that defines the REMOTE of pibackup-ship=rclone:REMOTE:path (made with rclone config).",
        "an absolute path to a readable file",
        "clouds.md",
        shown_default="rclone's own",
    ),
    Option(
        "pibackup-ship-allow-plaintext",
        "false",
        "true: ship to an rclone target without pibackup-ship-encrypt-key, so that its store holds the node's "
        "database in plain text. Without it such a target is refused.",
        "true or false",
        "clouds.md",
    ),
    Option(
        "pibackup-remote",
        None,
        "Keep a synchronous copy on another host running pibackup serve, over one ssh session: [user@]host:/path. "
        "A critical transaction is acknowledged to lightningd only once that host has synced it. Give it more than "
        "once for several hosts. Off when not set.",
        "[user@]host:/path, given once or more",
        "remote.md",
        multi=True,
        shown_default="off",
    ),
    _int("pibackup-remote-port", 22, 1, 65535, "(a TCP port)", "The ssh port of the pibackup-remote hosts.", "remote.md"),
    Option(
        "pibackup-remote-identity",
        None,
        "The ssh private key to log in to the pibackup-remote hosts with (absolute path). Default: ssh's own.",
        "an absolute path to a readable file",
        "remote.md",
        shown_default="ssh's own",
    ),
    Option(
        "pibackup-remote-known-hosts",
        None,
        "The known_hosts file holding the pibackup-remote hosts' keys (ssh never accepts an unknown key). "
        "Default: ~/.ssh/known_hosts of lightningd's user.",
        "an absolute path to a readable file",
        "remote.md",
        shown_default="~/.ssh/known_hosts",
    ),
    Option(
        "pibackup-remote-command",
        "pibackup serve",
        "The command that starts the receiver on the remote host; its directory is added as the last word.",
        "plain words (letters, digits and . _ / + , = @ % ~ : -)",
        "remote.md",
    ),
    _int(
        "pibackup-remote-timeout", 10, 1, 3600, "seconds",  # remote.md, "Why 10 s": TCP's retries on a flaky uplink, no long stall
        "Seconds a critical transaction may wait for a remote's acknowledgement before the remote counts as failed.",
        "remote.md",
    ),
    Option(
        "pibackup-remote-on-failure",
        "continue-degraded",  # remote.md, "Why continue-degraded": a halted node cannot defend its channels
        "When a remote cannot acknowledge: continue-degraded (go on with the local backup, warn, catch the remote up "
        "when it is back) or halt (refuse the transaction: lightningd stops).",
        "continue-degraded or halt",
        "remote.md",
    ),
    Option(
        "pibackup-remote-encrypt-key",
        None,
        "Encrypt everything sent to the pibackup-remote hosts with this key file (pibackup keygen FILE): they "
        "store and acknowledge ciphertext only.",
        "an absolute path to a key file of mode 600",
        "remote.md",
        shown_default="off",
    ),
    Option(
        "pibackup-compact-ratio",
        "0.4",  # docs/design/compaction.md, "Why 0.4"
        "Compact the backup automatically when its journal grows past this multiple of the database its snapshot holds "
        "(snapshots are stored compressed, so the uncompressed size counts): "
        "a new generation's snapshot is built in the background from the old snapshot and journal. 0: only "
        "on lightning-cli pibackup-compact.",
        f"0, or {COMPACT_RATIO_MIN:g} to {COMPACT_RATIO_MAX:g}",
        "compaction.md",
    ),
    _int(
        "pibackup-compact-min-kb", 64, 64, 1 << 30, "KiB",  # small enough that the ratio rules (the 3x bound)
        "Never compact automatically while the journal is smaller than this many KiB.",
        "compaction.md",
    ),
    _int(
        "pibackup-keep-generations", 2, 1, 100, "generations",
        "How many backup generations to keep, counting the one a compaction is building; older ones are "
        "deleted only once a newer one is complete and synced.",
        "compaction.md",
    ),
    Option(
        "pibackup-mode",
        "journal",
        "journal: a snapshot plus a checksummed journal, compacted in the background (the default). replica: a "
        "second SQLite database kept in step, one transaction per data_version.",
        " or ".join(MODES),
        "replica.md",
    ),
    Option(
        "pibackup-allow-same-medium",
        "false",
        "true: no warning when a pibackup-destination is on the same medium (SD card, disk) as lightningd's database. "
        "Such a backup dies with that medium; set it only for a copy kept there on purpose beside others.",
        "false or true",
        "status.md",
    ),
)

BY_NAME: Dict[str, Option] = {o.name: o for o in OPTIONS}


def default(name: str) -> Union[str, int, None]:
    return BY_NAME[name].default


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def options_page() -> str:
    """docs/guide/options.md, as `make docs` writes it and tests/unit/test_docs.py expects it."""
    lines = [
        "# Options",
        "",
        "<!-- Generated from pibackup/app/options.py by `make docs`; edit that table, not this page. -->",
        "",
        "All options go in lightningd's config file (for example `~/.lightning/config`), one",
        "`name=value` a line. Only `pibackup-destination` is required. A wrong value is refused at",
        "start with a message that names the option and the values it takes, and lightningd stops",
        "at its next database write (see [what happens when](what-happens-when.md)). The meaning",
        "column is the help text lightningd shows for the option.",
        "",
        "| option | default | values | meaning | more |",
        "|---|---|---|---|---|",
    ]
    for o in OPTIONS:
        shown = o.shown_default if o.shown_default is not None else f"`{o.default}`"
        page = o.guide[: -len(".md")].replace("-", " ")
        lines.append(f"| `{o.name}` | {_cell(shown)} | {_cell(o.values)} | {_cell(o.help)} | [{page}]({o.guide}) |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    """`python -m pibackup.app.options [FILE]`: write the options page to FILE, or print it."""
    argv = sys.argv[1:] if argv is None else argv
    page = options_page()
    if argv:
        with open(argv[0], "w", encoding="utf-8") as f:
            f.write(page)
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
