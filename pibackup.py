#!/usr/bin/env python3
"""The executable lightningd starts: important-plugin=/path/to/pibackup.py"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))

from pibackup.plugin import main  # noqa: E402

if __name__ == "__main__":
    main()
