"""A small spool fills during a read-only fault: partitions pause; kill -9 or SIGTERM; the next
worker replays.

Proves three properties through real worker processes and the real broker:
backpressure pauses consumption instead of growing the spool past its bound,
spooled writes survive a crash (they were acknowledged upstream, so only the
spool has them), and the replay after restart lands every span and signal
exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from pathlib import Path

import pytest

from betrace.config import Settings
from betrace.config.sections import ResilienceSettings
from betrace.dev.worker import WorkerProcess
from betrace.workload.generator import TraceGenerator
from betrace.workload.otlp import batch_messages
from betrace.workload.producer import produce
from tests.faults import immutable_supported, read_only_dir
from tests.integration.helpers import signal_keys, stored, wait_until_drained

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def spooled_items(root: Path) -> int:
    return sum(1 for _ in root.rglob("seg-*.spool"))


@pytest.mark.parametrize("stop", ["kill", "term"])
def test_full_spool_pauses_then_survives_a_stop_and_replays(
    pipeline_settings: Settings, tmp_path: Path, stop: str
) -> None:
    """``kill``: SIGKILL. ``term``: SIGTERM while a sink write is held, the spool full: faust
    cancels the handler mid-write, and its batch must not be committed for that."""
    if not immutable_supported(tmp_path):
        pytest.skip("needs root and chattr +i (see tests/faults.py)")
    spool_dir = tmp_path / "spool"
    cfg = pipeline_settings.model_copy(
        update={
            "resilience": ResilienceSettings(
                spool_dir=str(spool_dir),
                # Fills within seconds of load (kill). An empty spool takes any batch, however
                # big, so term makes the spool's own disk refuse writes instead: the first
                # failed sink write then holds its batch, whatever the batch sizes.
                spool_max_bytes=256 * 1024,
                spool_segment_bytes=32 * 1024,
                breaker_min_calls=2,
                breaker_reset_timeout_seconds=1.0,
            ),
        }
    )
    gen = TraceGenerator(tenants=("default", "acme"), violation_rate=0.2, seed=23)
    messages = list(batch_messages(gen.traces(4000), spans_per_message=50))
    first_part = len(messages) // 4
    asyncio.run(produce(cfg, messages[:first_part]))

    first = WorkerProcess(cfg, tmp_path / "worker1.log")
    first.start()
    try:
        wait_until_drained(cfg, first, timeout_s=120)
        loader = threading.Thread(target=lambda: asyncio.run(produce(cfg, messages[first_part:])))
        spool_fault = read_only_dir(spool_dir) if stop == "term" else contextlib.nullcontext()
        with read_only_dir(cfg.data_dir), spool_fault:
            loader.start()
            if stop == "term":
                assert first.wait_for_log("holding the batch", timeout=60), first.log_tail()
                first.stop()  # a graceful stop, with a batch held in a sink write
            else:
                assert first.wait_for_log("saturated; paused", timeout=60), first.log_tail()
                assert spooled_items(spool_dir) > 0
                time.sleep(1)
                first.kill()  # SIGKILL with writes in the spool and batches held
            left_in_spool = spooled_items(spool_dir) > 0
        loader.join(60)
    finally:
        first.kill()

    second = WorkerProcess(cfg, tmp_path / "worker2.log")
    second.start()
    try:
        if left_in_spool:
            assert second.wait_for_log("left by an earlier run wait for replay", 60), second.log_tail()
            # Replayed once partitions are assigned; after kill -9 the group first waits out
            # the dead member's session (faust's broker_session_timeout: 60 s).
            assert second.wait_for_log("spooled items", 150), second.log_tail()
        wait_until_drained(cfg, second, timeout_s=180)
        time.sleep(cfg.idle_timeout_s + 2)
        wait_until_drained(cfg, second, timeout_s=60)
        deadline = time.monotonic() + 30
        while spooled_items(spool_dir) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert spooled_items(spool_dir) == 0
        signals = signal_keys(cfg)
    finally:
        assert second.stop() == 0, second.log_tail()

    assert len(signals) == len(set(signals)), "a signal was published twice"
    assert sorted(signals) == sorted(gen.truth.expected)
    counts = stored(cfg)
    assert sum(c[0] for c in counts.values()) == gen.truth.spans
    assert all(rows == distinct for rows, distinct in counts.values())
