"""The command line: ``knlens <command>``."""

from knlens.cli.main import main

__all__ = ["main"]
