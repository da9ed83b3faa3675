"""Sinks: DuckDB hot storage, signal emission (and, later, ledger and cold storage)."""
