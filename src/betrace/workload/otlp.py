"""Encode generated traces as OTLP ``ExportTraceServiceRequest`` messages."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from betrace.workload.generator import TraceSpec


@dataclass(frozen=True, slots=True)
class OtlpMessage:
    """One Kafka record as the Collector's Kafka exporter would write it."""

    tenant: str
    key: bytes | None
    value: bytes
    spans: int


def _set_value(target: AnyValue, value: Any) -> None:
    if isinstance(value, bool):
        target.bool_value = value
    elif isinstance(value, int):
        target.int_value = value
    elif isinstance(value, float):
        target.double_value = value
    else:
        target.string_value = str(value)


def _attrs(target: Any, attrs: dict[str, Any]) -> None:
    for key, value in attrs.items():
        kv: KeyValue = target.add()
        kv.key = key
        _set_value(kv.value, value)


def encode_request(traces: Iterable[TraceSpec]) -> ExportTraceServiceRequest:
    """Group spans by service into ResourceSpans, as SDKs and the Collector do."""
    request = ExportTraceServiceRequest()
    by_service: dict[str, Any] = {}
    for trace in traces:
        for span in trace.spans:
            scope = by_service.get(span.service)
            if scope is None:
                rs = request.resource_spans.add()
                _attrs(rs.resource.attributes, {"service.name": span.service, "tenant.id": trace.tenant})
                scope = rs.scope_spans.add()
                scope.scope.name = "betrace.workload"
                by_service[span.service] = scope
            out = scope.spans.add()
            out.trace_id = trace.trace_id
            out.span_id = span.span_id
            if span.parent_span_id:
                out.parent_span_id = span.parent_span_id
            out.name = span.name
            out.kind = span.kind
            out.start_time_unix_nano = span.start_ns
            out.end_time_unix_nano = span.end_ns
            out.status.code = span.status_code
            _attrs(out.attributes, span.attributes)
    return request


def batch_messages(
    traces: Iterable[TraceSpec], *, spans_per_message: int = 200, by_trace_id: bool = False
) -> Iterator[OtlpMessage]:
    """Batch traces of one tenant per message (a header names the tenant).

    With ``by_trace_id`` every message holds one trace and its key is the trace
    id, like the exporter's ``partition_traces_by_id``.
    """
    pending: dict[str, list[TraceSpec]] = {}
    counts: dict[str, int] = {}
    for trace in traces:
        if by_trace_id:
            yield OtlpMessage(
                trace.tenant,
                trace.trace_id.hex().encode(),
                encode_request([trace]).SerializeToString(),
                len(trace.spans),
            )
            continue
        pending.setdefault(trace.tenant, []).append(trace)
        counts[trace.tenant] = counts.get(trace.tenant, 0) + len(trace.spans)
        if counts[trace.tenant] >= spans_per_message:
            batch = pending.pop(trace.tenant)
            yield OtlpMessage(
                trace.tenant, None, encode_request(batch).SerializeToString(), counts.pop(trace.tenant)
            )
    for tenant, batch in pending.items():
        yield OtlpMessage(tenant, None, encode_request(batch).SerializeToString(), counts[tenant])
