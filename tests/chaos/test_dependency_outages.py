"""Scenarios 4-6: a dependency goes away for a while as load flows, then comes back.

4. Redis (the cache tier) stopped, then started.
5. The DuckDB data directory becomes read-only (``chattr +i`` as root, see tests/faults.py).
6. The ledger is unavailable: the embedded (per-tenant) ledger files refuse writes
   (TigerBeetle is used instead only when a server address is configured).

Faults last a few seconds (``fault_seconds``); ``BETRACE_CHAOS_FULL=1`` gives the issue's 30 s.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydantic import SecretStr

from betrace.config import Settings
from betrace.dev.redis import LocalRedis
from betrace.sinks.ledger import tenant_ledger_path
from tests.chaos.harness import ChaosRun, fault_seconds
from tests.faults import read_only_dir

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.integration]


def _spool_outside(cfg: Settings, tmp_path: Path) -> Settings:
    # The spool lives on another disk than the data it protects, or a read-only disk takes both.
    resilience = cfg.resilience.model_copy(update={"spool_dir": str(tmp_path / "spool")})
    return cfg.model_copy(update={"resilience": resilience})


def test_redis_stopped_then_started(
    pipeline_settings: Settings, local_redis: LocalRedis, tmp_path: Path
) -> None:
    cache = pipeline_settings.cache.model_copy(update={"url": SecretStr(local_redis.url)})
    cfg = pipeline_settings.model_copy(update={"cache": cache})
    run = ChaosRun("4. Redis stopped, then started", cfg, tmp_path, spans=3_000, seed=404, redis=True)
    run.start_worker()
    run.load_in_background(chunks=10)
    time.sleep(1.5)
    down_for = fault_seconds(4.0)
    run.fault_begins(f"redis-server stopped for {down_for:.0f}s, then started")
    local_redis.stop()
    try:
        time.sleep(down_for)
    finally:
        local_redis.start()
    run.fault_ends()
    run.finish()


def test_duckdb_directory_read_only(pipeline_settings: Settings, tmp_path: Path) -> None:
    cfg = _spool_outside(pipeline_settings, tmp_path)
    run = ChaosRun("5. DuckDB directory read-only", cfg, tmp_path, spans=3_000, seed=505)
    run.start_worker()
    run.load_in_background(chunks=10)
    time.sleep(1.5)
    down_for = fault_seconds(4.0)
    run.fault_begins(f"data directory read-only (chattr +i) for {down_for:.0f}s")
    with read_only_dir(run.cfg.data_dir):
        time.sleep(down_for)
    run.fault_ends()
    run.finish()


def test_ledger_unavailable(pipeline_settings: Settings, tmp_path: Path) -> None:
    if pipeline_settings.tigerbeetle_addresses:
        pytest.skip("TigerBeetle configured: this scenario covers the embedded ledgers")
    cfg = _spool_outside(pipeline_settings, tmp_path)
    run = ChaosRun("6. ledger unavailable", cfg, tmp_path, spans=3_000, seed=606)
    run.start_worker()
    run.load_in_background(chunks=10)
    ledgers = tenant_ledger_path(run.cfg.data_dir, "default").parent
    deadline = time.monotonic() + 60
    while not any(ledgers.glob("*.duckdb")):  # the first signal creates the tenant ledgers
        assert time.monotonic() < deadline, "no ledger was created"
        time.sleep(0.2)
    down_for = fault_seconds(4.0)
    run.fault_begins(f"embedded ledgers' directory refuses writes (chattr +i) for {down_for:.0f}s")
    with read_only_dir(ledgers):
        time.sleep(down_for)
    run.fault_ends()
    run.finish()
