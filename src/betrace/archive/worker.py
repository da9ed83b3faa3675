"""Archival inside the worker that owns the tenant files: the daily task and the retention hook.

The job runs its DuckDB steps on the store's ``spans`` lane (the thread that
appends spans), its ledger steps on the ledger's thread, and its cold-storage
calls through the ``cold_storage`` circuit breaker when a registry is given.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from betrace.archive.coldread import ColdCatalog
from betrace.archive.job import ArchiveJob, RunReport
from betrace.archive.service import cleanup_cold, daily
from betrace.archive.storage import StateArchiveStatus, report_metrics, tenant_stats
from betrace.audit.events import AuditRecorder
from betrace.config import Settings
from betrace.errors import BetraceError
from betrace.resilience.breakers import COLD_STORAGE
from betrace.sinks.cold import ArrowColdStorage, open_cold_storage
from betrace.sinks.ledger.tenants import TenantArchivalLedger

if TYPE_CHECKING:
    from betrace.agents.app import Pipeline
    from betrace.resilience.breakers import BreakerRegistry

logger = logging.getLogger(__name__)

#: The breaker every cold-storage call of the worker goes through (issue 7).
COLD_BREAKER = COLD_STORAGE


class WorkerArchive:
    """What a downstream worker needs for archival, built once at start-up."""

    def __init__(
        self,
        pipeline: Pipeline,
        settings: Settings,
        *,
        breakers: BreakerRegistry | None = None,
        audit: AuditRecorder | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.settings = settings
        self.cold: ArrowColdStorage = open_cold_storage(settings.cold, settings.data_dir)
        self.catalog = ColdCatalog(self.cold)
        self.status = StateArchiveStatus(pipeline.store)
        guard = breakers.get(COLD_BREAKER).call if breakers is not None else None
        ledger = pipeline.ledger
        self.job = ArchiveJob(
            pipeline.store,
            self.cold,
            settings.archive,
            audit=audit,
            # Per-tenant ledgers: each archival event goes to its tenant's (owned) ledger.
            ledger=TenantArchivalLedger(ledger) if ledger is not None else None,
            ledger_run=ledger.run if ledger is not None else None,
            guard=guard,
            hooks=pipeline.hooks,
        )

    async def cleanup(self) -> Any:
        job = self.job
        return await cleanup_cold(
            self.pipeline.store,
            self.cold,
            self.settings.archive,
            apply=True,
            ledger=job.ledger,
            ledger_run=job._ledger_run,
            guard=job.guard,
        )

    def report_stats(self, _report: RunReport | None = None) -> None:
        store = self.pipeline.store
        for tenant in store.tenants():
            try:
                report_metrics(self.pipeline.hooks, tenant_stats(store, tenant))
            except BetraceError as exc:
                logger.warning("storage stats of %r unavailable: %s", tenant, exc)

    def task(self) -> Callable[[], Awaitable[None]]:
        """The faust task: run daily at ``BETRACE_ARCHIVE__SCHEDULE``."""

        async def run() -> None:
            await self.pipeline.store.run(self.report_stats, lane="spans")
            await daily(self.job, self.settings.archive, self.cleanup, on_report=self._stats_later)

        return run

    async def _stats_later(self, report: RunReport) -> None:
        # The figures changed: refresh them off the event loop, on the store's thread.
        await self.pipeline.store.run(self.report_stats, report, lane="spans")
