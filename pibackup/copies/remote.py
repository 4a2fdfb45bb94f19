"""Old home of reading a shipped copy, now fetch.py (through the transport) and readable.py;
these names stay importable from here until every importer is switched.
"""

from __future__ import annotations

from pibackup.copies.fetch import FREE_RESERVE, MAX_FILE_DEFAULT, fetch, is_remote  # noqa: F401  # moved: removed in the sweep
from pibackup.copies.readable import (  # noqa: F401  # moved: removed in the sweep
    CopyReport,
    Terminated,
    decrypt_tree,
    drop_unfinished_newest,
    encrypted_copy,
    older_than_records,
    private_workdir_base,
    readable_copy,
    remove_stale_workdirs,
)
from pibackup.copies.rsync import FETCH_FILTERS  # noqa: F401  # moved: removed in the sweep
