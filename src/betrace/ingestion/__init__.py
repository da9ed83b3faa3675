"""Ingestion runs (audited, with counters) and the OTLP/JSON file importer (issue 9)."""
