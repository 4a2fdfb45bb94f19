"""Bad option values and hostile inputs: each gets a clear message that says what to do.

Unit level (the same functions init calls); test_destination.py shows the same messages
arriving in lightningd's log through the real plugin, with the node halted."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pibackup.config import parse_options
from pibackup.destination import DestinationError, validate
from pibackup.errors import PibackupError
from pibackup.livedb import LiveDbError, find_live_db

OPTION_CASES = [
    ("pibackup-segment-size", "abc", "is not a size: write it like 32M or 512K"),
    ("pibackup-segment-size", "10", "is out of range: give 64K to 1G"),
    ("pibackup-segment-size", "2G", "is out of range: give 64K to 1G"),
    ("pibackup-segment-size", "-5M", "is not a size"),
    ("pibackup-segment-size", "5 TB", "is not a size"),
    ("pibackup-batch-seconds", -1, "is out of range: give 0 to 3600 seconds"),
    ("pibackup-batch-seconds", "soon", "is not a whole number of seconds"),
    ("pibackup-batch-seconds", 99999, "is out of range"),
    ("pibackup-batch-kb", 0, "is out of range: give 1 to 16384 KiB"),
    ("pibackup-filter-tables", "channels", "'channels' cannot be filtered"),
    ("pibackup-filter-tables", "utxoset;DROP TABLE vars", "cannot be filtered"),
    ("pibackup-filter-tables", "utxoset,peers", "'peers' cannot be filtered"),
    ("pibackup-led", "../../etc/passwd", "give the LED's name, e.g. ACT or led0, or none"),
    ("pibackup-min-free-mb", -1, "is out of range"),
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
    (newer / "PIBACKUP").write_text("pibackup backup directory\nformat 2\n")
    alien = tmp / "alien"
    alien.mkdir()
    (alien / "PIBACKUP").write_text("something else\n")
    return [
        (None, "pibackup-destination is not set"),
        ("", "pibackup-destination is not set"),
        ("usb/pibackup", "is a relative path; give an absolute path"),
        ("../usb", "is a relative path"),
        ("/nonexistent/stick", "does not exist: is the USB stick mounted?"),
        (str(f), "is not a directory"),
        (str(foreign), "holds files that are not pibackup's (photo.jpg)"),
        (str(newer), "format 2; this pibackup reads format 1 only"),
        (str(alien), "is not a pibackup marker"),
        ("/media/usb\n/x", "contains control characters"),
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
