"""Resilience: circuit breakers, the durable spool, backpressure, rule quarantine (issue 7)."""

from betrace.resilience.breakers import (
    COLD_STORAGE,
    DUCKDB,
    LEDGER,
    REDIS,
    RULES,
    Breaker,
    BreakerPolicy,
    BreakerRegistry,
    BreakerState,
    counts_as_failure,
)

__all__ = [
    "COLD_STORAGE",
    "DUCKDB",
    "LEDGER",
    "REDIS",
    "RULES",
    "Breaker",
    "BreakerPolicy",
    "BreakerRegistry",
    "BreakerState",
    "counts_as_failure",
]
