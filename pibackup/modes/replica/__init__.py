"""Replica mode: a full sqlite3 copy of the live database kept up to date."""
