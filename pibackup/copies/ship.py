"""Old home of the shipper, split into target, transport/rsync, staging, shipper (the round)
and schedule; the names app/ imports stay importable from here until it imports the new homes.
"""

from __future__ import annotations

from pibackup.copies.schedule import Shipper  # noqa: F401  # moved: removed in the sweep
from pibackup.copies.target import ShipConfig, ShipError, check_local_file, parse_target  # noqa: F401  # moved: removed in the sweep
