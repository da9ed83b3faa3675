"""``python -m betrace`` is the ``betrace`` command."""

from betrace.cli.main import main

main()
