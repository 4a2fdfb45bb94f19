"""The synchronous copy on another host: the protocol, the receiver (`pibackup serve`) and the sender."""
