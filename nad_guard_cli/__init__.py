"""The ``nad-guard`` command line: the one layer that imports both the library (``nad_guard``) and the
training code (``training``), so that the library never has to import either (ARCHITECTURE.md)."""

from nad_guard_cli.commands import main

__all__ = ["main"]
