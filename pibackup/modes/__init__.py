"""Backup modes: the writers behind the db_write hook and their restores."""
