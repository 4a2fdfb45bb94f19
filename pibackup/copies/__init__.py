"""Copies elsewhere: shipping with rsync over ssh, encryption, fetching a copy back."""
