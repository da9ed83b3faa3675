"""The worker's garbage-collector policy, shared with the benchmarks that measure its stages.

The stages allocate many short-lived objects per batch while holding many live
ones (open traces, decisions): with CPython's default thresholds every few
hundred allocations start a collection that rescans those live objects, which
cost the close path of assembly about a third of its time in a 100k-trace tick.
"""

from __future__ import annotations

import atexit
import gc

#: Young-generation threshold and the two older ones' (collections of the one below).
THRESHOLDS = (100_000, 50, 100)


def tune_gc() -> None:
    """Freeze what start-up built (it lives as long as the process) and collect less often."""
    gc.collect()
    gc.freeze()
    # Frozen objects skip the collection at interpreter exit, and DuckDB's bindings
    # (nanobind) then print a wall of "leaked instance" warnings: thaw them first.
    atexit.register(gc.unfreeze)
    gc.set_threshold(*THRESHOLDS)
