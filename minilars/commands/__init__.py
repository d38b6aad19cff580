"""Subcommands of the minilars CLI, one module each (see minilars/cli.py)."""
