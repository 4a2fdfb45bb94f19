"""pibackup: a crash-safe, restorable backup of Core Lightning's sqlite3 database."""

__version__ = "0.1.0"
