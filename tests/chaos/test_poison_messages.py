"""Scenario 8: poison records mixed into the input land in the dead-letter topic with reasons;
every other span and signal flows as if they were not there."""

from __future__ import annotations

from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from betrace.config import Settings
from betrace.streams.topics import DLQ_OFFSET, DLQ_REASON, DLQ_TOPIC
from betrace.workload.generator import TraceGenerator
from betrace.workload.otlp import OtlpMessage, batch_messages
from tests.chaos.harness import ChaosRun, metric_total

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.integration]


def _poison() -> list[tuple[OtlpMessage, str]]:
    """Bad records and the DLQ reason each must get. Their spans are not in the ground truth."""
    other = TraceGenerator(tenants=("acme",), violation_rate=0.0, seed=999)
    valid = [m.value for m in batch_messages(other.traces(200), spans_per_message=20)]
    zero_trace = ExportTraceServiceRequest()
    span = zero_trace.resource_spans.add().scope_spans.add().spans.add()
    span.trace_id, span.span_id, span.name = bytes(16), b"\x01" * 8, "zero-trace"
    return [
        (OtlpMessage("acme", None, b"\x0a\xff\xff\xff\x0f garbage", 0), "value"),
        (OtlpMessage("acme", None, b"", 0), "value"),
        (OtlpMessage("acme", None, b'{"resourceSpans": []}', 0), "value"),
        (OtlpMessage("acme", b"not-a-trace-id", valid[0], 0), "key"),
        (OtlpMessage("bad tenant!", None, valid[1], 0), "value"),
        (OtlpMessage("acme", None, zero_trace.SerializeToString(), 0), "invalid_span"),
    ]


def test_poison_messages_go_to_the_dlq_and_everything_else_flows(
    pipeline_settings: Settings, tmp_path: Path
) -> None:
    run = ChaosRun("8. poison messages", pipeline_settings, tmp_path, spans=3_000, seed=808)
    poison = _poison()
    mixed = list(run.messages)
    step = len(mixed) // (len(poison) + 1)
    for i, (message, _) in enumerate(poison):  # spread through the load
        mixed.insert((i + 1) * step + i, message)
    run.detectors["dead-letter"] = lambda: metric_total(run.web_port, "betrace_dead_letters_total") > 0
    run.start_worker()
    run.fault_begins(f"{len(poison)} poison records mixed into {len(run.messages)} good ones")
    run.load_in_background(mixed, chunks=6)
    run.wait_loaded()
    run.fault_ends()
    result = run.finish()
    assert result.detected_by is not None

    dead = run.read_topic(run.cfg.topics.dlq)
    assert len(dead) == len(poison), [dict(r.headers) for r in dead]
    for record in dead:
        headers = {k: v.decode(errors="replace") for k, v in record.headers}
        assert headers[DLQ_REASON], "a dead letter without a reason"
        assert headers[DLQ_TOPIC] == run.cfg.topics.input
        assert int(headers[DLQ_OFFSET]) >= 0
    reasons = sorted(dict(r.headers)[DLQ_REASON].decode() for r in dead)
    assert sum("invalid_span" in r for r in reasons) == 1
    assert sum("key" in r for r in reasons) == 1
