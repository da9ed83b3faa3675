"""The ``betrace`` command line."""
