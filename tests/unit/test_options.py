"""Bad option values and hostile inputs: each gets a clear message that says what to do.

Unit level (the same functions init calls); test_destination.py shows the same messages
arriving in lightningd's log through the real plugin, with the node halted."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import cli
from pibackup.app.config import parse_options
from pibackup.app.livedb import LiveDbError, find_live_db
from pibackup.errors import PibackupError
from pibackup.store.access import DestinationError, validate

OPTION_CASES = [
    ("pibackup-segment-size", "abc", "is not a size: write it like 32M or 512K"),
    ("pibackup-segment-size", "10", "is out of range: give 64K to 1G"),
    ("pibackup-segment-size", "2G", "is out of range: give 64K to 1G"),
    ("pibackup-segment-size", "-5M", "is not a size"),
    ("pibackup-segment-size", "5 TB", "is not a size"),
    ("pibackup-segment-size", "9" * 40 + "G", "is out of range: give 64K to 1G"),
    ("pibackup-batch-seconds", -1, "is out of range: give 0 to 3600 seconds"),
    ("pibackup-batch-seconds", "soon", "is not a whole number of seconds"),
    ("pibackup-batch-seconds", 99999, "is out of range"),
    ("pibackup-batch-kb", 0, "is out of range: give 1 to 16384 KiB"),
    ("pibackup-filter-tables", "channels", "'channels' cannot be filtered"),
    ("pibackup-filter-tables", "utxoset;DROP TABLE vars", "cannot be filtered"),
    ("pibackup-filter-tables", "utxoset,peers", "'peers' cannot be filtered"),
    ("pibackup-led", "../../etc/passwd", "give the LED's name, e.g. ACT or led0, or none"),
    ("pibackup-on-destination-failure", "degrade", "give halt (the default) or continue-degraded"),
    ("pibackup-min-free-mb", -1, "is out of range"),
    ("pibackup-min-free-mb", 10**30, "is out of range: give 0 to 1048576 MiB"),
    ("pibackup-preallocate-kb", 999999, "is out of range: give 0 to 65536 KiB"),
]


@pytest.mark.parametrize("name, value, message", OPTION_CASES)
def test_bad_option_value_gets_a_clear_message(name, value, message):
    with pytest.raises(PibackupError) as e:
        parse_options({"pibackup-destination": "/media/usb/pibackup", name: value})
    assert message in str(e.value) and name in str(e.value)


def _dest_cases(tmp: Path):
    f = tmp / "a-file"
    f.write_text("x")
    foreign = tmp / "foreign"
    foreign.mkdir()
    (foreign / "photo.jpg").write_text("x")
    newer = tmp / "newer"
    newer.mkdir()
    (newer / "PIBACKUP").write_text("pibackup backup directory\nformat 3\n")
    alien = tmp / "alien"
    alien.mkdir()
    (alien / "PIBACKUP").write_text("something else\n")
    linked_gen = tmp / "linked-gen"
    linked_gen.mkdir()
    (linked_gen / "PIBACKUP").write_text("pibackup backup directory\nformat 1\n")
    (linked_gen / "gen-000001").symlink_to("/etc")
    linked_marker = tmp / "linked-marker"
    linked_marker.mkdir()
    (linked_marker / "PIBACKUP").symlink_to(newer / "PIBACKUP")
    return [
        (None, "pibackup-destination is not set"),
        ("", "pibackup-destination is not set"),
        ("usb/pibackup", "is a relative path; give an absolute path"),
        ("../usb", "is a relative path"),
        ("/nonexistent/stick", "does not exist: is the USB stick mounted?"),
        (str(f), "is not a directory"),
        (str(foreign), "holds files that are not pibackup's (photo.jpg)"),
        (str(newer), "written by another release of pibackup, in backup format 3; this pibackup reads formats 1 and 2"),
        (str(alien), "is not a pibackup marker"),
        ("/media/usb\n/x", "contains control characters"),
        (str(linked_gen), "gen-000001 is a symbolic link (to /etc); pibackup never follows links inside its backup directory"),
        (str(linked_marker), "PIBACKUP is a symbolic link"),
    ]


def test_bad_destinations_get_a_clear_message(tmp_path):
    for value, message in _dest_cases(tmp_path):
        with pytest.raises(DestinationError) as e:
            validate(value)
        assert message in str(e.value), (value, str(e.value))


def test_bad_live_databases_get_a_clear_message(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a database")
    cases = [
        ("postgres://u:p@localhost/cln", "PostgreSQL wallet; pibackup backs up the sqlite3 wallet only"),
        ("mysql://x", "unknown wallet DSN"),
        (str(tmp_path / "missing.sqlite3"), "not found; if it lives elsewhere, set pibackup-live-db"),
        (str(text), "is not an sqlite3 database"),
        ("sqlite3://", "empty database path"),
    ]
    for value, message in cases:
        with pytest.raises(LiveDbError) as e:
            find_live_db(value, str(tmp_path))
        assert message in str(e.value), (value, str(e.value))


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "pibackup-segment-size",
                "pibackup-batch-seconds",
                "pibackup-batch-kb",
                "pibackup-filter-tables",
                "pibackup-led",
                "pibackup-min-free-mb",
                "pibackup-preallocate-kb",
                "pibackup-live-db",
            ]
        ),
        st.one_of(st.text(max_size=40), st.integers(), st.none(), st.booleans(), st.floats(allow_nan=True)),
    )
)
def test_option_parsing_never_fails_with_anything_but_a_clear_error(options):
    try:
        parse_options({"pibackup-destination": "/media/usb/pibackup", **options})
    except PibackupError as e:  # ConfigError, FilterError, LiveDbError: each names the option
        assert str(e).startswith("pibackup-"), str(e)


SHIP = "pi@backup.example.org:/srv/pibackup/node1"


def _ship_cases(tmp: Path):
    key = tmp / "ship.key"
    key.write_text("pibackup encryption key v1 " + "ab" * 32 + "\n")
    key.chmod(0o600)
    loose = tmp / "loose.key"
    loose.write_text(key.read_text())
    loose.chmod(0o644)
    short = tmp / "short.key"
    short.write_text("pibackup encryption key v1 abcd\n")
    short.chmod(0o600)
    ident = tmp / "id_ed25519"
    ident.write_text("x")
    spaced = tmp / "my key"
    spaced.write_text("x")
    return [
        ({"pibackup-ship": "host;reboot:/srv/x"}, "pibackup-ship: host 'host;reboot' is not a plain host name"),
        ({"pibackup-ship": "-oProxyCommand=sh:/srv/x"}, "is not a plain host name"),
        ({"pibackup-ship": "$(reboot)@host:/srv/x"}, "user name '$(reboot)' has characters that are not allowed"),
        ({"pibackup-ship": "host:/srv/my backup"}, "remote path '/srv/my backup' has characters that are not allowed"),
        ({"pibackup-ship": "host:/srv/`id`"}, "has characters that are not allowed"),
        ({"pibackup-ship": "host:/srv/x;rm -rf ~"}, "has characters that are not allowed"),
        ({"pibackup-ship": "host:/srv/../etc"}, "contains '..'"),
        ({"pibackup-ship": "host:/"}, "give a directory of its own for the copy, not '/'"),
        ({"pibackup-ship": "host:"}, "is not [user@]host:/path"),
        ({"pibackup-ship": "/srv/local"}, "is not [user@]host:/path"),
        ({"pibackup-ship": "host:/srv/x\ny"}, "contains control characters"),
        ({"pibackup-ship": SHIP, "pibackup-ship-port": 0}, "pibackup-ship-port=0 is out of range: give 1 to 65535"),
        ({"pibackup-ship": SHIP, "pibackup-ship-port": "ssh"}, "pibackup-ship-port='ssh' is not a whole number"),
        ({"pibackup-ship": SHIP, "pibackup-ship-interval": 0}, "pibackup-ship-interval=0 is out of range: give 1 to 86400"),
        ({"pibackup-ship": SHIP, "pibackup-ship-identity": str(tmp / "missing")}, "pibackup-ship-identity: cannot read"),
        ({"pibackup-ship": SHIP, "pibackup-ship-identity": "id_ed25519"}, "='id_ed25519': give an absolute path"),
        ({"pibackup-ship": SHIP, "pibackup-ship-identity": str(spaced)}, "no spaces or quotes"),
        ({"pibackup-ship": SHIP, "pibackup-ship-known-hosts": str(tmp / "kh")}, "pibackup-ship-known-hosts: cannot read"),
        ({"pibackup-ship": SHIP, "pibackup-ship-encrypt-key": "ship.key"}, "pibackup-ship-encrypt-key=ship.key is a relative path"),
        ({"pibackup-ship": SHIP, "pibackup-ship-encrypt-key": str(tmp / "nokey")}, "cannot read the encryption key"),
        ({"pibackup-ship": SHIP, "pibackup-ship-encrypt-key": str(ident)}, "is not a pibackup key file"),
        ({"pibackup-ship": SHIP, "pibackup-ship-encrypt-key": str(short)}, "the key is damaged"),
        ({"pibackup-ship": SHIP, "pibackup-ship-encrypt-key": str(loose)}, "can be read by other users; make it private: chmod 600"),
        ({"pibackup-ship-identity": str(ident)}, "pibackup-ship-identity is set but pibackup-ship is not"),
    ]


def test_bad_shipping_options_get_a_clear_message(tmp_path):
    for options, message in _ship_cases(tmp_path):
        with pytest.raises(PibackupError) as e:
            parse_options({"pibackup-destination": "/media/usb/pibackup", **options})
        assert message in str(e.value), (options, str(e.value))


def test_good_shipping_options_are_taken_as_given(tmp_path):
    ident = tmp_path / "id_ed25519"
    ident.write_text("x")
    cfg = parse_options(
        {
            "pibackup-destination": "/media/usb/pibackup",
            "pibackup-ship": "pi@[::1]:backups/node1/",
            "pibackup-ship-port": 2222,
            "pibackup-ship-identity": str(ident),
            "pibackup-ship-interval": 300,
        }
    )
    assert cfg.ship is not None
    assert (cfg.ship.target.user, cfg.ship.target.host, cfg.ship.target.path) == ("pi", "[::1]", "backups/node1")
    assert (cfg.ship.port, cfg.ship.identity, cfg.ship.interval, cfg.ship.key) == (2222, str(ident), 300, None)
    assert parse_options({"pibackup-destination": "/x", "pibackup-ship": "none", "pibackup-ship-port": 22}).ship is None


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_any_ship_target_is_either_safe_or_refused(spec):
    from pibackup.copies.target import ShipError, parse_target

    try:
        t = parse_target(spec)
    except ShipError as e:
        assert str(e).startswith("pibackup-ship"), str(e)
        return
    for part in (t.user or "", t.host, t.path):
        assert not set(part) & set(" \t\n\r'\"`$;&|<>()*?!\\{}#"), t
    assert not t.host.startswith("-") and not (t.user or "").startswith("-")


def test_a_linked_segment_or_snapshot_is_refused_by_the_writer_and_by_restore(tmp_path):
    from pibackup.store.directory import Destination

    for name in ("seg-000001.pbj", "snapshot-v5.sqlite3", "snapshot-v5.pbsnap"):
        d = tmp_path / name
        (d / "gen-000001").mkdir(parents=True)
        (d / "PIBACKUP").write_text("pibackup backup directory\nformat 1\n")
        (d / "gen-000001" / name).symlink_to("/etc/passwd")
        with pytest.raises(DestinationError, match=f"{name} is a symbolic link \\(to /etc/passwd\\)"):
            Destination(str(d)).generations()
        r = cli("restore", str(d), str(tmp_path / f"{name}.out"))
        assert r.returncode == 1 and "is a symbolic link" in r.stderr, r.stderr


def test_the_same_destination_twice_is_refused(tmp_path):
    (tmp_path / "stick").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "stick")
    for dests in ([str(tmp_path / "stick"), str(tmp_path / "stick")], [str(tmp_path / "stick"), str(tmp_path / "link")]):
        with pytest.raises(PibackupError, match="is given twice"):
            parse_options({"pibackup-destination": dests})
    cfg = parse_options({"pibackup-destination": ["/media/usb/pibackup", "/media/sd2/pibackup"]})
    assert cfg.destinations == ("/media/usb/pibackup", "/media/sd2/pibackup") and cfg.destination == "/media/usb/pibackup"


def test_every_mode_the_options_accept_has_a_registry_entry_and_no_other():
    from pibackup.app.modes import MODES as REGISTRY
    from pibackup.app.options import MODES as ACCEPTED

    assert set(REGISTRY) == set(ACCEPTED)
    assert all(m.name == name for name, m in REGISTRY.items())
