"""Trace integrity checks: at close (vectorised, in the downstream worker) and on demand (issue 9)."""
