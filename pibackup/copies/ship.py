"""Old home of the shipper, split into target, transport/rsync, staging, shipper (the round)
and schedule; these names stay importable from here until every importer is switched.
"""

from __future__ import annotations

from pibackup.copies.rsync import explain_rsync_failure, rsync_base, ssh_command  # noqa: F401  # moved: removed in the sweep
from pibackup.copies.schedule import Shipper, ShipStatus  # noqa: F401  # moved: removed in the sweep
from pibackup.copies.shipstate import FileState  # noqa: F401  # moved: removed in the sweep
from pibackup.copies.target import ShipConfig, ShipError, Target, check_local_file, parse_target  # noqa: F401  # moved: removed in the sweep
