"""The backup directory on disk: segments, generations, snapshots, replay, file-system helpers."""
