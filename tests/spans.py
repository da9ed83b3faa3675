"""Real spans for tests: generated traces, encoded as OTLP protobuf, decoded by the ingest decoder."""

from __future__ import annotations

import pyarrow as pa

from betrace.streams.otlp import OtlpDecoder, Record
from betrace.workload.generator import TraceGenerator
from betrace.workload.otlp import batch_messages


def generated_spans(
    tenants: tuple[str, ...], traces: int, *, seed: int, spans_per_message: int = 100
) -> pa.Table:
    """The spans of ``traces`` generated traces of ``tenants`` (30 % of them violations)."""
    generator = TraceGenerator(tenants=tenants, violation_rate=0.3, seed=seed)
    messages = batch_messages(generator.traces(traces), spans_per_message=spans_per_message)
    records = [Record(m.value) for m in messages]
    return OtlpDecoder(encoding="otlp_proto", tenant_header="h", default_tenant="x").decode(records).spans
