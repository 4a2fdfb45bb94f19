"""Old home of reading a shipped copy, now fetch.py (through the transport) and readable.py;
the names app/cli.py imports stay importable from here until it imports the new homes.
"""

from __future__ import annotations

from pibackup.copies.fetch import MAX_FILE_DEFAULT  # noqa: F401  # moved: removed in the sweep
from pibackup.copies.readable import CopyReport, Terminated, older_than_records, readable_copy  # noqa: F401  # moved: removed in the sweep
