"""Subcommands of the `fastgen` CLI, one module each (see fastgen/cli.py)."""
