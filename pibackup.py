#!/usr/bin/env python3
"""The executable lightningd starts: important-plugin=/path/to/pibackup.py"""

import os
import sys

if "MALLOC_ARENA_MAX" not in os.environ and sys.platform.startswith("linux") and __name__ == "__main__":
    # One malloc arena. Python serialises most allocation anyway; with glibc's default of
    # one arena per thread, the compaction thread's short-lived buffers stayed resident in
    # an arena of their own and raised the plugin's peak RSS by about 1 MB (make bench).
    # glibc reads the variable only at start, so set it and start again: same process,
    # same pipes to lightningd. The user's own setting is kept.
    os.environ["MALLOC_ARENA_MAX"] = "1"
    if sys.executable:
        try:
            os.execv(sys.executable, sys.orig_argv)
        except OSError:
            pass  # run on as we are: only memory is at stake

_here = os.path.dirname(os.path.realpath(__file__))
# The Debian package keeps its pinned pyln-client in vendor/ beside this file; a checkout
# has no vendor/ and uses the Python environment's.
sys.path[:0] = [_here] + [p for p in [os.path.join(_here, "vendor")] if os.path.isdir(p)]

from pibackup.app.plugin import main  # noqa: E402

if __name__ == "__main__":
    main()
