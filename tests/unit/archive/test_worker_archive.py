"""The worker's archival wiring, without a broker: the job on the store's lanes, the ledger's thread,
the cold_storage breaker, the retention hook and the storage gauges."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import duckdb
from prometheus_client import generate_latest

from betrace.agents.worker import build_worker
from betrace.archive.synthetic import fill_day
from betrace.archive.worker import COLD_BREAKER, WorkerArchive
from betrace.config import load_settings
from betrace.observability.prometheus import PrometheusHooks
from betrace.sinks.ledger.archival import ArchivalLedger

ROOT = Path(__file__).resolve().parents[3]


def test_worker_archive_runs_the_job_reports_gauges_and_feeds_retention(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    day = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=3)
    con = duckdb.connect(str(data / "tenant=acme.duckdb"))
    fill_day(con, "acme", day, spans=1_000, signals=5)
    con.close()
    settings = load_settings(data_dir=data, rules_dir=ROOT / "config" / "rules", archive={"hot_days": 1})
    pipeline, *_ = build_worker(settings)
    breakers = pipeline.resilience.breakers
    archive = WorkerArchive(pipeline, settings, breakers=breakers)
    # The worker owns tenants by assigned partition; here it is assigned all of them.
    pipeline.store.assign(set(range(settings.topics.partitions)))

    async def run() -> None:
        report = await archive.job.run()
        assert {u.state for u in report.units} == {"cleaned"}
        await archive._stats_later(report)
        cleanup = await archive.cleanup()
        assert cleanup.plan == []
        assert pipeline.ledger is not None
        await pipeline.ledger.close()

    asyncio.run(run())
    assert breakers.get(COLD_BREAKER).state == "closed"
    assert archive.status.archived_until_ns("acme") is not None
    assert isinstance(pipeline.hooks, PrometheusHooks)
    text = generate_latest(pipeline.hooks.registry).decode()
    assert 'betrace_storage_rows{kind="spans",tenant="acme",tier="cold"} 1000.0' in text
    assert 'betrace_archive_units_total{outcome="cleaned",tenant="acme"} 2.0' in text
    assert isinstance(archive.job.ledger, ArchivalLedger)
    pipeline.store.close()
