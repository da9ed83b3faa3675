"""Backpressure hysteresis and partition pausing on a consumer's pause/resume interface."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pytest

from betrace.config import load_settings
from betrace.metrics import InMemoryHooks
from betrace.resilience.backpressure import Backpressure
from betrace.resilience.wiring import Resilience, encode_spans
from betrace.sinks.duckdb_store import SpanStoreSink, TenantStore


class TP(NamedTuple):
    topic: str
    partition: int


@dataclass
class Consumer:
    """Records what faust's ``Consumer.pause_partitions``/``resume_partitions`` would receive."""

    assigned: set[TP]
    paused: set[TP] = field(default_factory=set)

    def assignment(self) -> set[TP]:
        return self.assigned

    def pause_partitions(self, tps: set[TP]) -> None:
        self.paused |= tps

    def resume_partitions(self, tps: set[TP]) -> None:
        self.paused -= tps


def test_hysteresis_pause_at_90_resume_below_50() -> None:
    fill = [0.0]
    hooks = InMemoryHooks()
    bp = Backpressure(high=0.9, low=0.5, hooks=hooks)
    bp.register("spool.spans", lambda: fill[0], ["spans"])
    consumer = Consumer({TP("spans", 0), TP("spans", 1), TP("traces", 0)})
    steps = []
    for level in (0.5, 0.89, 0.9, 0.7, 0.51, 0.49, 0.8):
        fill[0] = level
        bp.apply(consumer)
        steps.append((level, bp.is_saturated(), len(consumer.paused)))
    assert steps == [
        (0.5, False, 0),
        (0.89, False, 0),
        (0.9, True, 2),  # only the source's own topic
        (0.7, True, 2),  # still above the low watermark
        (0.51, True, 2),
        (0.49, False, 0),
        (0.8, False, 0),
    ]
    assert hooks.gauges[("betrace_paused_partitions", (("stage", "all"),))] == 0


def test_level_reasons_and_two_sources_on_one_topic() -> None:
    a, b = [0.95], [0.95]
    bp = Backpressure(high=0.9, low=0.5)
    bp.register("spool.spans", lambda: a[0], ["spans"])
    bp.register("sink.duckdb", lambda: b[0], ["spans"])
    consumer = Consumer({TP("spans", 0)})
    bp.apply(consumer)
    assert consumer.paused == {TP("spans", 0)}
    assert bp.level() == 0.95
    assert len(bp.reasons()) == 2 and "spool.spans is 95% full" in bp.reasons()[1]
    a[0] = 0.1
    bp.apply(consumer)
    assert consumer.paused == {TP("spans", 0)}  # the other source still needs the pause
    b[0] = 0.1
    bp.apply(consumer)
    assert consumer.paused == set()
    assert bp.reasons() == []


def test_a_broken_level_reads_as_empty_and_unstarted_consumer_is_skipped() -> None:
    def boom() -> float:
        raise RuntimeError("gone")

    bp = Backpressure()
    bp.register("x", boom, ["spans"])
    assert bp.level() == 0.0

    class NotStarted:
        def assignment(self) -> set[TP]:
            raise RuntimeError("consumer not started")

    bp.apply(NotStarted())


def test_watermarks_are_validated() -> None:
    with pytest.raises(ValueError, match="low < high"):
        Backpressure(high=0.5, low=0.9)


def test_worker_tick_pauses_the_topic_of_a_full_spool(tmp_path: Path) -> None:
    """Resilience.tick over a real spool (filled to 100 %) and a real DuckDB store."""
    table = pa.table({"tenant": ["acme"] * 3, "trace_id": ["0" * 32] * 3, "span_id": ["1", "2", "3"]})
    payload, _ = encode_spans([table])
    record = len(payload) + 12
    cfg = load_settings(
        data_dir=tmp_path / "data",
        resilience={"spool_dir": str(tmp_path / "spool"), "spool_max_bytes": max(1024, record * 10)},
    )
    res = Resilience.build(cfg)
    store = TenantStore(cfg.data_dir)
    sink = SpanStoreSink(store, max_rows=1000, hooks=InMemoryHooks())
    res.guard_span_sink(sink, ["spans"])
    assert sink.writer is not None
    assert sink.breaker is not None
    consumer = Consumer({TP("spans", 0), TP("traces", 0)})
    spool = sink.writer.spool
    while spool.fill < 0.9:
        spool.append([(payload, 3)])
    try:
        sink.breaker.open()  # no replay possible: the spool stays full
        asyncio.run(res.tick(consumer))
        assert consumer.paused == {TP("spans", 0)}
        assert res.backpressure.is_saturated()
        assert res.pending_items()["spans"] == spool.items > 0
    finally:
        res.close()
        store.close()
