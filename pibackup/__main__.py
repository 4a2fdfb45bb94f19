"""`python3 -m pibackup ...`: the command line."""

import sys

from pibackup.app.cli import main

sys.exit(main())
