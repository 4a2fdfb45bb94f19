"""`python3 -m pibackup ...`: the command line."""

import sys

from .cli import main

sys.exit(main())
