"""Running archival and cold cleanup: shared by the worker's daily task and the CLI."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from betrace.archive import state
from betrace.archive.job import ArchiveJob, RunReport
from betrace.archive.retry import Backoff, Guard, retrying
from betrace.archive.storage import PurgeItem, delete_files, mark_purged, plan_cleanup, purge_events
from betrace.config.sections import ArchiveSettings
from betrace.errors import BetraceError
from betrace.sinks.cold.base import ColdStorage
from betrace.sinks.duckdb_store import TenantStore
from betrace.sinks.ledger.archival import ArchivalLedger

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class CleanupReport:
    plan: list[PurgeItem] = field(default_factory=list)
    applied: bool = False
    files_deleted: int = 0

    @property
    def bytes(self) -> int:
        return sum(i.unit.bytes for i in self.plan)


async def cleanup_cold(
    store: TenantStore,
    cold: ColdStorage,
    settings: ArchiveSettings,
    *,
    tenants: list[str] | None = None,
    apply: bool = False,
    ledger: ArchivalLedger | None = None,
    ledger_run: Callable[[Callable[[], Any]], Awaitable[Any]] | None = None,
    guard: Guard[Any] | None = None,
    now: dt.date | None = None,
) -> CleanupReport:
    """Plan (and with ``apply`` carry out) the TTL and quota removals from cold storage."""
    report = CleanupReport(applied=apply)
    backoff = Backoff(settings.retries, settings.backoff_base_s, settings.backoff_max_s)
    for tenant in tenants if tenants is not None else store.tenants():

        def plan_sync(tenant: str = tenant) -> list[PurgeItem]:
            with store.cursor(tenant) as con:
                state.ensure_schema(con)
                return plan_cleanup(con, tenant, settings, now)

        plan: list[PurgeItem] = await store.run(plan_sync, lane="spans")
        report.plan.extend(plan)
        if not apply:
            continue

        def purge_sync(tenant: str = tenant, plan: list[PurgeItem] = plan) -> list[state.Unit]:
            with store.cursor(tenant) as con:
                if plan:
                    mark_purged(con, plan)
                # Files of every purged unit, including ones an interrupted cleanup left behind.
                return state.units(con, "state = 'purged'")

        purged: list[state.Unit] = await store.run(purge_sync, lane="spans")
        leftover = [u for u in purged if any(cold.exists(k) for k in u.keys)] if purged else []
        if leftover:
            report.files_deleted += await retrying(
                f"cold cleanup of {tenant}",
                functools.partial(delete_files, cold, tenant, leftover),
                backoff,
                guard,
            )
        if ledger is not None and plan:
            run = ledger_run or asyncio.to_thread
            try:
                await run(functools.partial(ledger.post, purge_events(plan)))
            except BetraceError as exc:
                logger.warning("archive cleanup: ledger events of %s not recorded: %s", tenant, exc)
    return report


def seconds_until(schedule: str, now: dt.datetime) -> float:
    """Seconds from ``now`` (UTC) to the next ``HH:MM`` UTC."""
    hour, minute = (int(x) for x in schedule.split(":"))
    target = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    if target <= now:
        target += dt.timedelta(days=1)
    return (target - now).total_seconds()


async def daily(
    job: ArchiveJob,
    settings: ArchiveSettings,
    cleanup: Callable[[], Awaitable[CleanupReport]],
    *,
    clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    on_report: Callable[[RunReport], Awaitable[None]] | None = None,
) -> None:
    """Forever: sleep until the scheduled time, archive every tenant, then apply cold cleanup."""
    while True:
        pause = seconds_until(settings.schedule, clock())
        logger.info("archive: next run at %s UTC, in %.0f s", settings.schedule, pause)
        await asyncio.sleep(pause)
        try:
            report = await job.run()
            logger.info(
                "archive: run finished: %d units, %d rows archived, %d failed",
                len(report.units),
                report.rows,
                len(report.failed),
            )
            if on_report:
                await on_report(report)
            await cleanup()
        except BetraceError as exc:  # the worker keeps running; the next run resumes
            logger.error("archive: run failed: %s", exc)  # noqa: TRY400 - no traceback for known errors
        await asyncio.sleep(1.0)  # never twice in the same minute
