"""A real worker with Redis: Redis stops while load flows, comes back; the result is exact."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import redis
from pydantic import SecretStr

from betrace.config import Settings
from betrace.dev.redis import LocalRedis
from betrace.dev.worker import WorkerProcess
from betrace.workload.generator import TraceGenerator
from betrace.workload.otlp import batch_messages
from betrace.workload.producer import produce
from tests.integration.helpers import signal_keys, stored, wait_until_drained


def _count(url: str, pattern: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        return sum(1 for _ in client.scan_iter(match=pattern, count=1000))
    finally:
        client.close()


def _wait_for_keys(url: str, pattern: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _count(url, pattern):
            return True
        time.sleep(0.25)
    return False


def test_redis_outage_under_load_loses_and_duplicates_nothing(
    pipeline_settings: Settings, local_redis: LocalRedis, redis_url: str, tmp_path: Path
) -> None:
    cfg = pipeline_settings.model_copy(
        update={
            "cache": pipeline_settings.cache.model_copy(update={"url": SecretStr(redis_url)}),
            # A short breaker reset, so the worker tries Redis again within the test.
            "resilience": pipeline_settings.resilience.model_copy(
                update={"breaker_reset_timeout_seconds": 1.0, "breaker_min_calls": 2}
            ),
        }
    )
    gen = TraceGenerator(tenants=("default", "acme"), violation_rate=0.2, seed=7)
    messages = list(batch_messages(gen.traces(9_000), spans_per_message=30))
    third = len(messages) // 3
    prefix = f"{cfg.cache.key_prefix}:{cfg.app_id}"

    worker = WorkerProcess(cfg, tmp_path / "worker.log")
    worker.start()
    try:
        asyncio.run(produce(cfg, messages[:third]))
        assert worker.wait_for_log("rules: ", timeout=60), worker.log_tail()
        # The first traces close: their verdicts are written through to Redis.
        assert _wait_for_keys(redis_url, f"{prefix}:trace_meta:*", 30.0), worker.log_tail()
        assert _count(redis_url, f"{prefix}:rule_defs:*") >= 3, worker.log_tail()

        local_redis.stop()  # the real server goes away while load flows
        asyncio.run(produce(cfg, messages[third : 2 * third]))
        time.sleep(3)
        assert worker.alive, worker.log_tail()
        local_redis.start()  # empty: no persistence

        asyncio.run(produce(cfg, messages[2 * third :]))
        wait_until_drained(cfg, worker, timeout_s=120)
        time.sleep(cfg.idle_timeout_s + 2)  # the last traces close on the idle timer
        wait_until_drained(cfg, worker, timeout_s=60)
        signals = signal_keys(cfg)
        assert worker.wait_for_log("unavailable", timeout=1), "the worker never noticed the outage"
        assert worker.wait_for_log("is back", timeout=1), "the worker never used Redis again"
        assert _wait_for_keys(redis_url, f"{prefix}:trace_meta:*", 5.0)  # written again after the restart
    finally:
        assert worker.stop() == 0, worker.log_tail()

    assert len(signals) == len(set(signals)), "a signal was published twice"
    assert sorted(signals) == sorted(gen.truth.expected)
    counts = stored(cfg)
    assert sum(c[0] for c in counts.values()) == gen.truth.spans  # every span stored
    assert all(rows == distinct for rows, distinct in counts.values())  # and once
