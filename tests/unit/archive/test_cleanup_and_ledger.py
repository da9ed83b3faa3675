"""Cold cleanup (TTL per data type, quota), storage figures, the schedule, and ledger bookkeeping."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import pytest
from pydantic import ValidationError
from tests.unit.archive.conftest import DAYS, SIGNALS_PER_DAY, SPANS_PER_DAY, TODAY, make_job

from betrace.archive import state
from betrace.archive.coldread import ColdCatalog
from betrace.archive.service import cleanup_cold, seconds_until
from betrace.archive.storage import report_metrics, tenant_stats
from betrace.config.sections import ArchiveSettings
from betrace.metrics import InMemoryHooks
from betrace.sinks.cold import FilesystemColdStorage
from betrace.sinks.duckdb_store import TenantStore
from betrace.sinks.ledger import EmbeddedLedger, SignalLedger
from betrace.sinks.ledger.archival import ArchivalLedger


def _units(store: TenantStore) -> list[state.Unit]:
    with store.cursor("acme") as con:
        return state.units(con)


def test_ttl_per_type_dry_run_then_apply(store: TenantStore, cold: FilesystemColdStorage) -> None:
    asyncio.run(make_job(store, cold).run())
    settings = ArchiveSettings(spans_ttl_days=3, signals_ttl_days=0)  # spans of DAYS[0] (4 days old) expire
    dry = asyncio.run(cleanup_cold(store, cold, settings, now=TODAY))
    assert [(i.unit.day, i.unit.kind, i.reason) for i in dry.plan] == [(DAYS[0], "spans", "ttl")]
    assert not dry.applied and all(u.state == "cleaned" for u in _units(store))
    assert cold.exists(f"acme/{DAYS[0]:%Y/%m/%d}/spans-0000.parquet")
    done = asyncio.run(cleanup_cold(store, cold, settings, apply=True, now=TODAY))
    assert done.files_deleted == 2  # spans + traces files
    assert not cold.exists(f"acme/{DAYS[0]:%Y/%m/%d}/spans-0000.parquet")
    assert cold.exists(f"acme/{DAYS[0]:%Y/%m/%d}/signals-0000.parquet")  # signals live longer
    with store.cursor("acme") as con:
        files = ColdCatalog(cold).files(con)
    assert len(files["spans"]) == 2 and len(files["signals"]) == 3
    again = asyncio.run(cleanup_cold(store, cold, settings, apply=True, now=TODAY))
    assert again.plan == [] and again.files_deleted == 0


def test_quota_removes_oldest_days_first(store: TenantStore, cold: FilesystemColdStorage) -> None:
    asyncio.run(make_job(store, cold).run())
    total = sum(u.bytes for u in _units(store))
    newest = sum(u.bytes for u in _units(store) if u.day == DAYS[2])
    settings = ArchiveSettings(spans_ttl_days=0, signals_ttl_days=0, tenant_quota_bytes=newest + 1)
    report = asyncio.run(cleanup_cold(store, cold, settings, apply=True, now=TODAY))
    assert sorted({i.unit.day for i in report.plan}) == DAYS[:2]
    assert all(i.reason == "quota" for i in report.plan)
    assert report.bytes == total - newest
    left = [s.key for s in cold.list("acme") if s.key.endswith(".parquet")]
    assert all(f"{DAYS[2]:%Y/%m/%d}" in k for k in left) and len(left) == 3


def test_stats_per_tier_and_metrics(store: TenantStore, cold: FilesystemColdStorage) -> None:
    asyncio.run(make_job(store, cold).run(day=DAYS[0]))
    hot, cold_tier = tenant_stats(store, "acme")
    assert (hot.tier, hot.spans, hot.signals, hot.oldest, hot.newest) == (
        "hot",
        2 * SPANS_PER_DAY,
        2 * SIGNALS_PER_DAY,
        DAYS[1],
        DAYS[2],
    )
    assert hot.bytes > 0
    assert (cold_tier.spans, cold_tier.signals, cold_tier.oldest, cold_tier.newest) == (
        SPANS_PER_DAY,
        SIGNALS_PER_DAY,
        DAYS[0],
        DAYS[0],
    )
    assert cold_tier.bytes == sum(s.size for s in cold.list("acme") if s.key.endswith(".parquet"))
    hooks = InMemoryHooks()
    report_metrics(hooks, [hot, cold_tier])
    key = ("betrace_storage_rows", (("kind", "spans"), ("tenant", "acme"), ("tier", "cold")))
    assert hooks.gauges[key] == SPANS_PER_DAY


def test_ledger_counts_each_unit_once_across_reruns(
    tmp_path: Path, store: TenantStore, cold: FilesystemColdStorage
) -> None:
    signals = SignalLedger(EmbeddedLedger(tmp_path / "ledger.duckdb"), hooks=InMemoryHooks())
    archival = ArchivalLedger(signals)
    try:
        asyncio.run(make_job(store, cold, ledger=archival).run())
        assert all(u.ledger_posted for u in _units(store))
        with store.cursor("acme") as con:  # as if a crash hit between cleanup and the ledger write
            con.execute("UPDATE archive_days SET ledger_posted = FALSE")
        asyncio.run(make_job(store, cold, ledger=archival).run())
        assert all(u.ledger_posted for u in _units(store))
        assert archival.balance("acme", "spans", "archived") == 3 * SPANS_PER_DAY
        assert archival.balance("acme", "signals", "archived") == 3 * SIGNALS_PER_DAY
        assert archival.balance("acme", "spans", "verified") == 0
    finally:
        signals.shutdown()


def test_schedule_is_validated_and_next_run_computed() -> None:
    assert ArchiveSettings(schedule="2:05").schedule == "02:05"
    for bad in ("24:00", "2am", "02:60", ""):
        with pytest.raises(ValidationError, match="HH:MM"):
            ArchiveSettings(schedule=bad)
    now = dt.datetime(2026, 11, 25, 1, 0, tzinfo=dt.UTC)
    assert seconds_until("02:00", now) == 3600
    assert seconds_until("02:00", now.replace(hour=2)) == 86400
    assert seconds_until("00:30", now) == 23.5 * 3600
