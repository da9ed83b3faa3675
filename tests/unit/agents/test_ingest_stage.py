"""Ingest: the bounded duplicate cache and the decode/dedupe/repartition stage."""

from __future__ import annotations

from collections import Counter

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from betrace.agents.ingest import DedupeCache, IngestStage
from betrace.config import Settings
from betrace.metrics import METRICS, InMemoryHooks
from betrace.streams.otlp import Record
from betrace.streams.topics import partition_of
from betrace.workload.generator import TraceGenerator
from betrace.workload.otlp import batch_messages


def settings(*, partitions: int = 4, dedupe: int = 1_000) -> Settings:
    return Settings(
        topics={"partitions": partitions},
        dedupe_cache_size=dedupe,
        tenant_header="X-Scope-OrgID",
        default_tenant="default",
    )


def workload(spans: int = 400, seed: int = 1) -> tuple[list[Record], int]:
    generator = TraceGenerator(tenants=("default", "acme"), seed=seed)
    messages = list(batch_messages(generator.traces(spans), spans_per_message=60))
    records = [
        Record(m.value, headers=[("X-Scope-OrgID", m.tenant.encode())], offset=i)
        for i, m in enumerate(messages)
    ]
    return records, generator.truth.spans


def one_span(trace: str, span: str) -> bytes:
    request = ExportTraceServiceRequest()
    s = request.resource_spans.add().scope_spans.add().spans.add()
    s.trace_id, s.span_id, s.name = bytes.fromhex(trace), bytes.fromhex(span), "op"
    data: bytes = request.SerializeToString()
    return data


# --- DedupeCache ---------------------------------------------------------------


def test_dedupe_within_one_batch() -> None:
    cache = DedupeCache(100)
    assert cache.fresh_mask(["a", "b", "a", "c", "b", "a"]) == [True, True, False, True, False, False]
    assert len(cache) == 3


def test_dedupe_across_batches() -> None:
    cache = DedupeCache(100)
    assert cache.fresh_mask(["a", "b"]) == [True, True]
    assert cache.fresh_mask(["b", "c"]) == [False, True]
    assert cache.fresh_mask(["a", "c", "d"]) == [False, False, True]


def test_dedupe_remembers_keys_across_one_generation_swap() -> None:
    cache = DedupeCache(4)  # young generation holds 2 keys, then becomes the old one
    assert cache.fresh_mask(["a", "b"]) == [True, True]  # swap: old={a,b}
    assert cache.fresh_mask(["c"]) == [True]
    assert cache.fresh_mask(["a"]) == [False]  # still in the old generation
    assert cache.fresh_mask(["d"]) == [True]  # swap: old={c,d}; a and b forgotten
    assert cache.fresh_mask(["a", "c"]) == [True, False]


def test_dedupe_is_bounded() -> None:
    cache = DedupeCache(100)
    for i in range(10_000):
        cache.fresh_mask([f"k{i}"])
        assert len(cache) <= 100
    # Recent keys are remembered, old ones were evicted.
    assert cache.fresh_mask(["k9999", "k0"]) == [False, True]


def test_dedupe_capacity_zero_disables() -> None:
    cache = DedupeCache(0)
    assert cache.fresh_mask(["a", "a"]) == [True, True]
    assert cache.fresh_mask(["a"]) == [True]
    assert len(cache) == 0


# --- IngestStage ---------------------------------------------------------------


def test_ingest_partitions_every_span_by_trace_id() -> None:
    records, expected = workload()
    hooks = InMemoryHooks()
    result = IngestStage(settings(partitions=3), hooks).process(records)

    assert result.dead_letters == []
    assert result.duplicates == 0
    assert result.spans == expected == sum(t.num_rows for _, t in result.partitions)
    for partition, table in result.partitions:
        assert set(partition_of(table.column("trace_id").to_pylist(), 3)) == {partition}
    tenants = Counter(t for _, table in result.partitions for t in table.column("tenant").to_pylist())
    assert set(tenants) == {"default", "acme"}
    assert hooks.total("betrace_records_in_total", stage="ingest") == len(records)
    assert hooks.total("betrace_spans_in_total", stage="ingest") == expected
    assert hooks.total("betrace_spans_out_total", stage="ingest") == expected


def test_ingest_drops_exact_duplicates_and_counts_them() -> None:
    records, expected = workload()
    hooks = InMemoryHooks()
    stage = IngestStage(settings(), hooks)
    first = stage.process(records[:3])
    # A redelivery of the first records plus the rest: only the rest is new.
    second = stage.process(records)
    assert first.spans + second.spans == expected
    assert second.duplicates == first.spans
    assert hooks.total("betrace_duplicates_total", stage="ingest") == first.spans
    assert hooks.total("betrace_spans_in_total") == first.spans + expected
    assert hooks.total("betrace_spans_out_total") == expected
    # Everything again: all duplicates, nothing out.
    third = stage.process(records)
    assert (third.spans, third.duplicates, third.partitions) == (0, expected, [])


def test_ingest_duplicates_within_one_batch() -> None:
    trace, span = "ab" * 16, "cd" * 8
    value = one_span(trace, span)
    hooks = InMemoryHooks()
    result = IngestStage(settings(), hooks).process([Record(value), Record(value), Record(value)])
    assert (result.spans, result.duplicates) == (1, 2)
    assert hooks.total("betrace_duplicates_total") == 2


def test_same_span_ids_of_two_tenants_are_not_duplicates() -> None:
    value = one_span("ab" * 16, "cd" * 8)
    records = [Record(value, headers=[("X-Scope-OrgID", t)]) for t in (b"acme", b"globex")]
    result = IngestStage(settings(), InMemoryHooks()).process(records)
    assert (result.spans, result.duplicates) == (2, 0)


def test_ingest_without_dedupe_keeps_redeliveries() -> None:
    value = one_span("ab" * 16, "cd" * 8)
    hooks = InMemoryHooks()
    stage = IngestStage(settings(dedupe=0), hooks)
    assert stage.process([Record(value), Record(value)]).spans == 2
    assert stage.process([Record(value)]).spans == 1
    assert hooks.total("betrace_duplicates_total") == 0


def test_ingest_counts_dead_letters_by_reason(caplog: pytest.LogCaptureFixture) -> None:
    good = Record(one_span("ab" * 16, "cd" * 8))
    bad_value = Record(b"\xff\xff", topic="otlp_spans", partition=2, offset=77)
    bad_key = Record(one_span("ab" * 16, "ce" * 8), key=b"nope")
    hooks = InMemoryHooks()
    with caplog.at_level("WARNING", logger="betrace.agents.ingest"):
        result = IngestStage(settings(), hooks).process([good, bad_value, bad_key])
    assert result.spans == 1
    assert [d.record for d in result.dead_letters] == [bad_value, bad_key]
    assert hooks.total("betrace_dead_letters_total", stage="ingest") == 2
    assert hooks.total("betrace_dead_letters_total", reason="invalid_value") == 1
    assert hooks.total("betrace_dead_letters_total", reason="invalid_key") == 1
    assert "otlp_spans[2]@77: invalid_value" in caplog.text


def test_ingest_of_nothing() -> None:
    hooks = InMemoryHooks()
    result = IngestStage(settings(), hooks).process([])
    assert (result.spans, result.partitions, result.dead_letters) == (0, [], [])
    assert hooks.total("betrace_records_in_total") == 0


def test_ingest_reports_only_declared_metrics() -> None:
    records, _ = workload(100)
    hooks = InMemoryHooks()
    stage = IngestStage(settings(), hooks)
    stage.process([*records, *records, Record(b"junk")])
    declared = {m.name: set(m.labels) for m in METRICS}
    assert hooks.counters
    for name, labels in hooks.counters:
        assert name in declared
        assert {k for k, _ in labels} == declared[name]
