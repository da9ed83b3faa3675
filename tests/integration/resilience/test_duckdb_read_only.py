"""A real fault through a real worker: the data directory refuses writes while load flows.

The DuckDB files and the embedded ledger (also DuckDB, in the same directory)
become immutable (``chattr +i``, see tests/faults.py) for a few seconds. The
``duckdb`` and ``ledger`` breakers open, the span and signal sinks spool to
their own directory, readiness names the open breakers; after the fault the
breakers close, the spools replay, and the final state equals the ground
truth: every span once, every expected signal once, ledger counts == signals.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from betrace.config import Settings
from betrace.config.sections import ResilienceSettings
from betrace.dev.worker import WorkerProcess
from betrace.metrics import InMemoryHooks
from betrace.sinks.ledger import SignalLedger, open_ledger
from betrace.workload.generator import TraceGenerator
from betrace.workload.otlp import batch_messages
from betrace.workload.producer import produce
from tests.faults import immutable_supported, read_only_dir
from tests.integration.helpers import signal_keys, stored, wait_until_drained

pytestmark = [pytest.mark.integration]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ready(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=2) as r:
            return int(r.status), json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read())


def ledger_counts(cfg: Settings, pairs: set[tuple[str, str]]) -> dict[tuple[str, str], int]:
    counts = {}
    for t, r in pairs:  # one embedded ledger file per tenant
        ledger = SignalLedger(open_ledger(cfg.data_dir, read_only=True, tenant=t), hooks=InMemoryHooks())
        try:
            counts[(t, r)] = sum(c.signals for c in ledger.counts(t, r))
        finally:
            ledger.shutdown()
    return counts


def test_read_only_data_dir_breaks_spools_and_recovers_exactly(
    pipeline_settings: Settings, tmp_path: Path
) -> None:
    if not immutable_supported(tmp_path):
        pytest.skip("needs root and chattr +i (see tests/faults.py)")
    port = free_port()
    cfg = pipeline_settings.model_copy(
        update={
            "web_port": port,
            "resilience": ResilienceSettings(
                spool_dir=str(tmp_path / "spool"),  # another volume than the failing one
                breaker_min_calls=2,
                breaker_window_seconds=10,
                breaker_reset_timeout_seconds=1.0,
            ),
        }
    )
    gen = TraceGenerator(tenants=("default", "acme"), violation_rate=0.2, seed=7)
    messages = list(batch_messages(gen.traces(3000), spans_per_message=50))
    third = len(messages) // 3
    asyncio.run(produce(cfg, messages[:third]))

    worker = WorkerProcess(cfg, tmp_path / "worker.log")
    worker.start()
    try:
        wait_until_drained(cfg, worker, timeout_s=120)  # tenant files and ledger exist and are open
        loader = threading.Thread(target=lambda: asyncio.run(produce(cfg, messages[third:])))
        with read_only_dir(cfg.data_dir):
            loader.start()
            assert worker.wait_for_log("breaker duckdb: closed -> open", timeout=30), worker.log_tail()
            status, body = ready(port)
            assert status == 503, body
            assert not body["checks"]["breakers"]["ok"]
            assert "duckdb open" in body["checks"]["breakers"]["detail"]
            time.sleep(3)  # load keeps flowing into the spools meanwhile
            loader.join(60)
        assert any((tmp_path / "spool").rglob("seg-*.spool")) or worker.wait_for_log("replayed", 1)
        assert worker.wait_for_log("half_open -> closed", timeout=30), worker.log_tail()
        wait_until_drained(cfg, worker, timeout_s=120)
        time.sleep(cfg.idle_timeout_s + 2)  # the last traces close on the idle timer
        wait_until_drained(cfg, worker, timeout_s=60)
        deadline = time.monotonic() + 30
        while any((tmp_path / "spool").rglob("seg-*.spool")) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not any((tmp_path / "spool").rglob("seg-*.spool")), "the spools were not replayed"
        assert worker.wait_for_log("replayed", timeout=1), worker.log_tail()
        signals = signal_keys(cfg)
    finally:
        assert worker.stop() == 0, worker.log_tail()

    assert len(signals) == len(set(signals)), "a signal was published twice"
    assert sorted(signals) == sorted(gen.truth.expected)
    counts = stored(cfg)
    assert sum(c[0] for c in counts.values()) == gen.truth.spans
    assert all(rows == distinct for rows, distinct in counts.values())
    per_rule: dict[tuple[str, str], int] = {}
    for tenant, rule, _ in signals:
        per_rule[(tenant, rule)] = per_rule.get((tenant, rule), 0) + 1
    assert ledger_counts(cfg, set(per_rule)) == per_rule
