"""Close-time integrity checks as a sink: closed traces in, anomalies into each tenant's file.

The evaluate stage only *adds* its batch (no copy: Arrow tables are
immutable); a timer flushes, and the check and its writes run on the tenant
store's own ``integrity`` executor lane, so neither the event loop nor the
span or signal writes wait for them. A full buffer never blocks the pipeline:
that batch goes unchecked and is counted (``betrace_integrity_skipped_total``);
the periodic recheck over stored spans still covers those traces.
"""

from __future__ import annotations

import logging
import time

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from betrace.errors import BackpressureError
from betrace.integrity.store import CheckOutcome, check_stored, find_closed, record_closed
from betrace.metrics import StageHooks
from betrace.sinks.base import BatchingSink
from betrace.sinks.duckdb_store import TenantStore
from betrace.streams.topics import split_by_tenant

logger = logging.getLogger(__name__)
anomaly_log = logging.getLogger("betrace.anomaly")

STEP_ID = "integrity"


def report(hooks: StageHooks, outcome: CheckOutcome, source: str) -> None:
    """Metrics and one log line per check that changed anything."""
    for kind, n in outcome.opened.items():
        hooks.count("betrace_anomalies_total", n, kind=kind, source=source)
    for kind, n in outcome.resolved.items():
        hooks.count("betrace_anomalies_resolved_total", n, kind=kind)
    if outcome.opened or outcome.resolved:
        anomaly_log.info(
            "integrity %s tenant=%s: opened %s, resolved %s",
            source,
            outcome.tenant,
            dict(outcome.opened) or "none",
            dict(outcome.resolved) or "none",
        )


class IntegritySink(BatchingSink[pa.Table]):
    """Buffer closed traces; check and record their anomalies per tenant on flush."""

    step_id = STEP_ID

    def __init__(self, store: TenantStore, *, skew_ms: float, max_spans: int, hooks: StageHooks) -> None:
        super().__init__(max_items=max_spans, hooks=hooks)
        self.store = store
        self.skew_ns = int(skew_ms * 1_000_000)
        self._scratch: duckdb.DuckDBPyConnection | None = None

    def offer(self, traces: pa.Table) -> bool:
        """Add a batch unless the buffer is full; never raises, never waits."""
        if traces.num_rows == 0:
            return True
        try:
            self.add(traces, size=traces.num_rows)
        except BackpressureError:
            self.hooks.count("betrace_integrity_skipped_total", traces.num_rows, stage=STEP_ID)
            return False
        return True

    async def write(self, batch: list[pa.Table]) -> None:
        outcomes = await self.store.run(self._write_sync, batch, lane=STEP_ID)
        for outcome in outcomes:
            report(self.hooks, outcome, "close")

    def _write_sync(self, batch: list[pa.Table]) -> list[CheckOutcome]:
        started = time.perf_counter()
        traces = pa.concat_tables(batch)
        tenants = pc.unique(traces.column("tenant")).to_pylist()
        owned = [t for t in tenants if self.store.owns(t)]  # others: their owner's recheck covers them
        if len(owned) < len(tenants):
            traces = traces.filter(pc.is_in(traces.column("tenant"), pa.array(owned, pa.string())))
        outcomes = []
        if owned:
            if self._scratch is None:  # made on this sink's writer thread, used only there
                self._scratch = duckdb.connect(":memory:")
            found = find_closed(self._scratch, traces, self.skew_ns)
            for tenant, part in split_by_tenant(found) if found.num_rows else ():
                with self.store.cursor(tenant) as con:
                    outcomes.append(record_closed(con, tenant, part))
        self.hooks.observe("betrace_integrity_check_seconds", time.perf_counter() - started, source="close")
        return outcomes

    async def flush_quietly(self) -> None:
        """For a timer: a failed check is logged, never raised into faust."""
        try:
            await self.flush()
        except Exception:
            logger.warning(
                "integrity: close-time check failed; the periodic recheck will cover it", exc_info=True
            )

    async def recheck(self, lookback_s: float) -> None:
        """Re-check every tenant's traces that ended within ``lookback_s``; resolve what is fixed."""
        since = time.time_ns() - int(lookback_s * 1e9)
        for tenant in self.store.tenants():
            try:
                outcome = await self.store.run(self._recheck_sync, tenant, since, lane=STEP_ID)
            except Exception:
                logger.warning("integrity: recheck of tenant %r failed", tenant, exc_info=True)
                continue
            report(self.hooks, outcome, "recheck")

    def _recheck_sync(self, tenant: str, since_ns: int) -> CheckOutcome:
        started = time.perf_counter()
        with self.store.cursor(tenant) as con:
            outcome = check_stored(con, tenant, since_ns=since_ns, skew_ns=self.skew_ns)
        self.hooks.observe("betrace_integrity_check_seconds", time.perf_counter() - started, source="recheck")
        return outcome
