"""Pipeline stages: ingest -> assemble -> evaluate -> sink, one module each."""
