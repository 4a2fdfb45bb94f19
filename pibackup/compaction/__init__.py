"""Compaction: a child process builds a new snapshot; the new generation and retention."""
