"""Assembly state survives a rebalance in which a worker keeps (or gets back) its partitions."""

from __future__ import annotations

import re
import time
from pathlib import Path

from betrace.config import Settings
from betrace.dev.worker import WorkerProcess
from betrace.workload.generator import TraceGenerator
from betrace.workload.otlp import batch_messages
from tests.integration.helpers import run_worker_over

EVENT = re.compile(r"restored (\d+) assembly state entries|partitions \[[\d, ]*\] revoked")


def _events(worker: WorkerProcess) -> list[int | None]:
    """The worker's recoveries (entries restored) and revocations (None), in order."""
    text = worker.log_file.read_text(errors="replace")
    return [int(m.group(1)) if m.group(1) else None for m in EVENT.finditer(text)]


def _restored_after_revocations(worker: WorkerProcess, n: int) -> int | None:
    events = _events(worker)
    revoked = [i for i, e in enumerate(events) if e is None]
    if len(revoked) < n:
        return None
    after = [e for e in events[revoked[n - 1] + 1 :] if e is not None]
    return after[-1] if after else None


def test_a_worker_recovers_all_its_state_after_a_rebalance(
    pipeline_settings: Settings, tmp_path: Path
) -> None:
    cfg = pipeline_settings.model_copy(update={"api_port": 0, "web_port": 0})
    gen = TraceGenerator(tenants=("acme",), violation_rate=0.1, seed=13)
    run_worker_over(
        cfg, tmp_path / "w0.log", list(batch_messages(list(gen.traces(1_000)), spans_per_message=300))
    )
    worker = WorkerProcess(cfg, tmp_path / "w.log")
    other = WorkerProcess(cfg, tmp_path / "x.log")
    worker.start()
    try:
        assert worker.wait_for_log("assembly state entries", 90), worker.log_tail()
        [total] = _events(worker)
        assert total
        # A second worker joins (the first drops all its state in the eager rebalance and keeps
        # half the partitions), then leaves (the first gets every partition back).
        other.start()
        assert other.wait_for_log("store: owning tenant partitions", 90), other.log_tail()
        assert other.stop() == 0, other.log_tail()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and _restored_after_revocations(worker, 2) != total:
            assert worker.alive, worker.log_tail()
            time.sleep(0.5)
        # Every decision is back, not only those of the partitions the other worker had.
        assert _restored_after_revocations(worker, 2) == total, (_events(worker), worker.log_tail())
    finally:
        other.stop()
        assert worker.stop() == 0, worker.log_tail()
