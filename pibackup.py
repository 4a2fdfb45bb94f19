#!/usr/bin/env python3
"""The executable lightningd starts: important-plugin=/path/to/pibackup.py"""

import os
import sys

_here = os.path.dirname(os.path.realpath(__file__))
# The Debian package keeps its pinned pyln-client in vendor/ beside this file; a checkout
# has no vendor/ and uses the Python environment's.
sys.path[:0] = [_here] + [p for p in [os.path.join(_here, "vendor")] if os.path.isdir(p)]

from pibackup.plugin import main  # noqa: E402

if __name__ == "__main__":
    main()
