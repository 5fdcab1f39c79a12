"""``python -m nad_guard_cli``: the same as the ``nad-guard`` command."""

from nad_guard_cli.commands import main

main()
