"""Restoring a whole node: the network directory, the hsm_secret check, emergency.recover."""
