"""The walking skeleton end to end: real broker, real worker process, real DuckDB files."""

from __future__ import annotations

import asyncio
from pathlib import Path

from betrace.config import Settings
from betrace.dev.worker import WorkerProcess
from betrace.workload.generator import TraceGenerator
from betrace.workload.otlp import batch_messages
from betrace.workload.producer import produce
from tests.integration.helpers import run_worker_over, signal_keys, stored, wait_until_drained


def test_signals_and_spans_exactly_once_even_on_replay(pipeline_settings: Settings, tmp_path: Path) -> None:
    cfg = pipeline_settings
    gen = TraceGenerator(tenants=("default", "acme"), violation_rate=0.15, seed=42)
    messages = list(batch_messages(gen.traces(20_000), spans_per_message=150))
    truth = gen.truth
    assert truth.expected, "the workload must plant violations"

    run_worker_over(cfg, tmp_path / "worker1.log", messages)
    first_signals = signal_keys(cfg)
    assert sorted(first_signals) == sorted(truth.expected)  # exactly those, each once
    counts = stored(cfg)
    assert sum(c[0] for c in counts.values()) == truth.spans
    assert all(rows == distinct for rows, distinct in counts.values())
    per_tenant = dict.fromkeys(("default", "acme"), 0)
    for tenant, _, _ in truth.expected:
        per_tenant[tenant] += 1
    assert {t for t, _, _ in first_signals} == {t for t, n in per_tenant.items() if n}

    # The same bytes again, to a fresh worker process: nothing may change.
    run_worker_over(cfg, tmp_path / "worker2.log", messages)
    assert sorted(signal_keys(cfg)) == sorted(first_signals)
    assert stored(cfg) == counts


def test_partition_traces_by_id_keys(pipeline_settings: Settings, tmp_path: Path) -> None:
    """The Collector exporter's partition_traces_by_id: one trace per message, keyed by trace id."""
    cfg = pipeline_settings
    gen = TraceGenerator(tenants=("acme",), violation_rate=0.3, seed=3)
    messages = list(batch_messages(gen.traces(3_000), by_trace_id=True))
    assert all(m.key is not None and len(m.key) == 32 for m in messages)
    run_worker_over(cfg, tmp_path / "worker.log", messages)
    assert sorted(signal_keys(cfg)) == sorted(gen.truth.expected)
    assert stored(cfg) == {"acme": (gen.truth.spans, gen.truth.spans)}


def test_ingest_and_downstream_in_separate_processes(pipeline_settings: Settings, tmp_path: Path) -> None:
    """BETRACE_STAGES splits the pipeline over two processes and consumer groups, same results."""
    cfg = pipeline_settings
    gen = TraceGenerator(tenants=("default", "acme"), violation_rate=0.2, seed=21)
    asyncio.run(produce(cfg, list(batch_messages(gen.traces(5_000)))))
    ingest = WorkerProcess(cfg.model_copy(update={"stages": "ingest"}), tmp_path / "ingest.log")
    downstream = WorkerProcess(cfg.model_copy(update={"stages": "downstream"}), tmp_path / "downstream.log")
    ingest.start()
    downstream.start()
    try:
        wait_until_drained(cfg.model_copy(update={"stages": "ingest"}), ingest, topics=[cfg.topics.input])
        wait_until_drained(cfg, downstream, topics=[cfg.topics.spans, cfg.topics.traces])
        # SIGUSR1 logs where messages are held; drained, nothing is, and the worker runs on.
        state = downstream.dump_state()
        assert f"{cfg.topics.spans}[0]: read " in state, state
        assert "span sink held messages: 0" in state, state
        assert "task " in state, state
        assert downstream.alive
    finally:
        assert ingest.stop() == 0, ingest.log_tail()
        assert downstream.stop() == 0, downstream.log_tail()
    assert sorted(signal_keys(cfg)) == sorted(gen.truth.expected)
    assert sum(rows for rows, _ in stored(cfg).values()) == gen.truth.spans
    # A clean stop leaves a clean log: no interpreter-exit noise from native bindings.
    for log in (tmp_path / "ingest.log", tmp_path / "downstream.log"):
        assert "nanobind: leaked" not in log.read_text(errors="replace"), log.name
