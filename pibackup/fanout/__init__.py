"""Several destinations written side by side."""
