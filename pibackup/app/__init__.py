"""The plugin and the command: options, hook, status, CLI."""
