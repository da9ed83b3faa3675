"""Storage figures per tenant and tier, the retention hook, and cold-side cleanup (TTL, quota).

Cleanup policies (seed 003, "Automated Cleanup System"):

* **TTL per data type**: archived spans older than ``spans_ttl_days`` and
  signals older than ``signals_ttl_days`` are removed from cold storage (0 keeps
  them forever).
* **Size-based**: when a tenant's cold bytes exceed ``tenant_quota_bytes``, its
  oldest archived days go first until it fits.
* **Manual**: ``betrace storage cleanup`` shows the plan (dry run) and applies it
  with ``--apply``; the worker applies it after each scheduled archival run.

A purge first marks the unit ``purged`` (queries stop reading it in that
commit), then deletes its files and rewrites the day's manifest; a crash in
between leaves files no query reads, and the next cleanup deletes them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from betrace.archive import state
from betrace.archive.layout import DAY_NS, Manifest, day_start_ns, manifest_key, today
from betrace.archive.state import Unit
from betrace.config.sections import ArchiveSettings
from betrace.metrics import StageHooks
from betrace.sinks.cold.base import ColdObjectMissingError, ColdStorage
from betrace.sinks.duckdb_store import TenantStore
from betrace.sinks.ledger.archival import ArchivalEvent

logger = logging.getLogger(__name__)


class StateArchiveStatus:
    """The :class:`~betrace.sinks.duckdb_store.ArchiveStatus` hook, read from ``archive_days``.

    Everything before the earliest day that still has hot traces is archived
    (cleanup removed it); with no cleaned unit at all, nothing is.
    """

    def __init__(self, store: TenantStore) -> None:
        self.store = store

    def archived_until_ns(self, tenant: str) -> int | None:
        with self.store.cursor(tenant) as con:
            cleaned = state.units(con, "state IN ('cleaned', 'purged') AND kind = 'spans'")
            if not cleaned:
                return None
            row = con.execute("SELECT min(start_ns) FROM trace_summaries").fetchone()
        last = max(u.day for u in cleaned) + dt.timedelta(days=1)
        until = day_start_ns(last)
        if row and row[0] is not None:
            until = min(until, int(row[0]) // DAY_NS * DAY_NS)
        return until


@dataclass(frozen=True, slots=True)
class TierStats:
    tenant: str
    tier: str
    bytes: int
    spans: int
    signals: int
    oldest: dt.date | None
    newest: dt.date | None
    failed: int = 0


def _day(value: Any) -> dt.date | None:
    return value if isinstance(value, dt.date) else None


def hot_stats(con: duckdb.DuckDBPyConnection, tenant: str, path: Path) -> TierStats:
    size = sum(p.stat().st_size for p in (path, path.with_name(path.name + ".wal")) if p.exists())
    row = con.execute(
        "SELECT (SELECT count(*) FROM spans), (SELECT count(*) FROM signals), "
        "(SELECT CAST(to_timestamp(min(start_ns) // 1000000000) AT TIME ZONE 'UTC' AS DATE) FROM spans), "
        "(SELECT CAST(to_timestamp(max(start_ns) // 1000000000) AT TIME ZONE 'UTC' AS DATE) FROM spans)"
    ).fetchone()
    assert row is not None
    failed = len(state.units(con, "state = 'failed'"))
    return TierStats(tenant, "hot", size, int(row[0]), int(row[1]), _day(row[2]), _day(row[3]), failed)


def cold_stats(con: duckdb.DuckDBPyConnection, tenant: str) -> TierStats:
    units = state.units(con, "state = 'cleaned'")
    days = [u.day for u in units]
    return TierStats(
        tenant,
        "cold",
        sum(u.bytes for u in units),
        sum(u.rows for u in units if u.kind == "spans"),
        sum(u.rows for u in units if u.kind == "signals"),
        min(days) if days else None,
        max(days) if days else None,
    )


def tenant_stats(store: TenantStore, tenant: str) -> list[TierStats]:
    with store.cursor(tenant) as con:
        return [hot_stats(con, tenant, store.path(tenant)), cold_stats(con, tenant)]


def report_metrics(hooks: StageHooks, stats: list[TierStats]) -> None:
    """The ``storage stats`` figures as gauges (``betrace_storage_*``)."""
    for s in stats:
        hooks.gauge("betrace_storage_bytes", s.bytes, tenant=s.tenant, tier=s.tier)
        hooks.gauge("betrace_storage_rows", s.spans, tenant=s.tenant, tier=s.tier, kind="spans")
        hooks.gauge("betrace_storage_rows", s.signals, tenant=s.tenant, tier=s.tier, kind="signals")
        for edge, day in (("oldest", s.oldest), ("newest", s.newest)):
            if day is not None:
                hooks.gauge(
                    "betrace_storage_day_seconds",
                    day_start_ns(day) / 1e9,
                    tenant=s.tenant,
                    tier=s.tier,
                    edge=edge,
                )


# -- cleanup ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PurgeItem:
    tenant: str
    unit: Unit
    #: ``ttl`` or ``quota``.
    reason: str


def plan_cleanup(
    con: duckdb.DuckDBPyConnection, tenant: str, settings: ArchiveSettings, now: dt.date | None = None
) -> list[PurgeItem]:
    """What TTL and quota would remove from cold storage, oldest first."""
    now = now or today()
    ttl = {"spans": settings.spans_ttl_days, "signals": settings.signals_ttl_days}
    cleaned = state.units(con, "state = 'cleaned'")
    plan: list[PurgeItem] = []
    chosen: set[tuple[dt.date, str, int]] = set()
    for unit in cleaned:
        days = ttl[unit.kind]
        if days and unit.day < now - dt.timedelta(days=days):
            plan.append(PurgeItem(tenant, unit, "ttl"))
            chosen.add((unit.day, unit.kind, unit.part))
    quota = settings.tenant_quota_bytes
    if quota:
        remaining = [u for u in cleaned if (u.day, u.kind, u.part) not in chosen]
        total = sum(u.bytes for u in remaining)
        for day in sorted({u.day for u in remaining}):
            if total <= quota:
                break
            for unit in (u for u in remaining if u.day == day):
                plan.append(PurgeItem(tenant, unit, "quota"))
                total -= unit.bytes
    return plan


def mark_purged(con: duckdb.DuckDBPyConnection, items: list[PurgeItem]) -> None:
    con.execute("BEGIN TRANSACTION")
    try:
        for item in items:
            state.upsert(
                con, dataclasses.replace(item.unit, state="purged", last_good="purged", reason=item.reason)
            )
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def delete_files(cold: ColdStorage, tenant: str, units: list[Unit]) -> int:
    """Delete purged units' files and drop them from their manifests; idempotent."""
    removed = 0
    by_day: dict[dt.date, set[str]] = {}
    for unit in units:
        for key in unit.keys:
            removed += int(cold.delete(key))
            by_day.setdefault(unit.day, set()).add(key)
    for day, keys in by_day.items():
        key = manifest_key(tenant, day)
        try:
            manifest = Manifest.from_json(cold.get(key))
        except ColdObjectMissingError:
            continue
        manifest.remove(keys)
        if manifest.files:
            cold.put(key, manifest.to_json())
        else:
            cold.delete(key)
    return removed


def purge_events(items: list[PurgeItem]) -> list[ArchivalEvent]:
    return [
        ArchivalEvent(i.tenant, i.unit.day, i.unit.kind, i.unit.part, "purge", i.unit.rows) for i in items
    ]
