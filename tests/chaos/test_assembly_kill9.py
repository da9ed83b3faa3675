"""kill -9 a worker mid-stream, start another: no span lost, no signal twice (real broker)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from betrace.config import Settings
from betrace.dev.worker import WorkerProcess
from betrace.workload.generator import TraceGenerator
from betrace.workload.otlp import batch_messages
from betrace.workload.producer import produce
from tests.integration.helpers import signal_keys, stored, wait_until_drained

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.integration]


def test_kill9_mid_stream_then_restart_matches_ground_truth(
    pipeline_settings: Settings, tmp_path: Path
) -> None:
    # Small windows and a short checkpoint interval, so that the kill lands while
    # traces are windowed and state sits in the changelog topics.
    cfg = pipeline_settings.model_copy(update={"window_spans": 8, "checkpoint_interval_s": 0.5})
    gen = TraceGenerator(tenants=("default", "acme"), violation_rate=0.2, seed=11)
    messages = list(batch_messages(gen.traces(12_000), spans_per_message=40))
    half = len(messages) // 2
    asyncio.run(produce(cfg, messages[:half]))

    first = WorkerProcess(cfg, tmp_path / "worker1.log")
    first.start()
    try:
        time.sleep(12)  # mid-stream: some traces closed, some open, some checkpointed
        asyncio.run(produce(cfg, messages[half:]))
        time.sleep(1)
    finally:
        first.kill()  # SIGKILL: no shutdown, no flush, no commit

    second = WorkerProcess(cfg, tmp_path / "worker2.log")
    second.start()
    try:
        wait_until_drained(cfg, second, timeout_s=240)
        time.sleep(cfg.idle_timeout_s + 2)  # the last traces close on the idle timer
        wait_until_drained(cfg, second, timeout_s=120)
        signals = signal_keys(cfg)  # while the worker runs: the topic, not its files
        assert second.wait_for_log("restored", timeout=1), "the state was not recovered from the changelog"
    finally:
        assert second.stop() == 0, second.log_tail()

    assert len(signals) == len(set(signals)), "a signal was published twice"
    assert sorted(signals) == sorted(gen.truth.expected)
    counts = stored(cfg)
    assert sum(c[0] for c in counts.values()) == gen.truth.spans  # no span lost
    assert all(rows == distinct for rows, distinct in counts.values())
