"""Field values outside the column types, and loosely written ids.

Protobuf enums are open and ``fixed64`` timestamps are unsigned, so a
well-formed OTLP record can carry a span kind, status code or timestamp that
does not fit ``SPAN_SCHEMA`` (int8 / int64). Such values must never fail the
whole batch: unknown enums count as unspecified/unset, and a span whose
timestamps do not fit is an invalid span (the record is dead-lettered, its
other spans are kept).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from betrace.streams.otlp import DecodedBatch, OtlpDecoder, Record

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
OTHER_SPAN = "00f067aa0ba902b8"
MAX_NS = 2**63 - 1


def decode(encoding: str, *records: Record) -> DecodedBatch:
    return OtlpDecoder(encoding=encoding, tenant_header="X-Scope-OrgID", default_tenant="d").decode(records)


def proto_value(**fields: int) -> bytes:
    """A request with one span built from ``fields`` and one ordinary span."""
    request = ExportTraceServiceRequest()
    spans = request.resource_spans.add().scope_spans.add().spans
    for span_id, values in ((SPAN, fields), (OTHER_SPAN, {})):
        span = spans.add()
        span.trace_id, span.span_id, span.name = bytes.fromhex(TRACE), bytes.fromhex(span_id), "op"
        span.kind = values.get("kind", 1)
        span.status.code = values.get("status", 0)
        span.start_time_unix_nano = values.get("start", 10)
        span.end_time_unix_nano = values.get("end", 20)
    data: bytes = request.SerializeToString()
    return data


def json_value(**fields: Any) -> bytes:
    """The same two spans as :func:`proto_value`, as OTLP/JSON."""
    spans = []
    for span_id, values in ((SPAN, fields), (OTHER_SPAN, {})):
        doc = {"traceId": TRACE, "spanId": span_id, "name": "op", "startTimeUnixNano": "10"}
        doc["endTimeUnixNano"] = "20"
        doc.update(values)
        spans.append(doc)
    return json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": spans}]}]}).encode()  # any int size


def first_row(batch: DecodedBatch) -> dict[str, Any]:
    rows: list[dict[str, Any]] = batch.spans.to_pylist()
    return rows[0]


@pytest.mark.parametrize(
    ("kind", "status", "stored"),
    [
        (0, 0, (0, 0)),
        (5, 2, (5, 2)),
        (6, 3, (0, 0)),
        (127, 127, (0, 0)),
        (200, 500, (0, 0)),
        (-1, -128, (0, 0)),
    ],
)
def test_proto_unknown_enums_count_as_unspecified(kind: int, status: int, stored: tuple[int, int]) -> None:
    batch = decode("otlp_proto", Record(proto_value(kind=kind, status=status)))
    assert batch.dead_letters == []
    assert batch.spans.num_rows == 2
    row = first_row(batch)
    assert (row["kind"], row["status_code"]) == stored


@pytest.mark.parametrize(
    ("kind", "status", "stored"),
    [
        ("SPAN_KIND_PRODUCER", "STATUS_CODE_ERROR", (4, 2)),
        (4, 2, (4, 2)),
        (1000, {"code": 300}, (0, 0)),
        (-7, {"code": -1}, (0, 0)),
        (2**70, {"code": 2**70}, (0, 0)),
    ],
)
def test_json_unknown_enums_count_as_unspecified(kind: Any, status: Any, stored: tuple[int, int]) -> None:
    status_doc = status if isinstance(status, dict) else {"code": status}
    batch = decode("otlp_json", Record(json_value(kind=kind, status=status_doc)))
    assert batch.dead_letters == []
    row = first_row(batch)
    assert (row["kind"], row["status_code"]) == stored


def test_largest_int64_timestamp_is_kept() -> None:
    for encoding, value in (
        ("otlp_proto", proto_value(start=MAX_NS, end=MAX_NS)),
        ("otlp_json", json_value(startTimeUnixNano=str(MAX_NS), endTimeUnixNano=str(MAX_NS))),
    ):
        batch = decode(encoding, Record(value))
        assert batch.dead_letters == []
        assert first_row(batch)["end_ns"] == MAX_NS


@pytest.mark.parametrize(
    "fields", [{"start": MAX_NS + 1}, {"end": 2**64 - 1}], ids=["start-2^63", "end-2^64-1"]
)
def test_proto_timestamp_beyond_int64_is_an_invalid_span(fields: dict[str, int]) -> None:
    good, bad = Record(proto_value(), offset=1), Record(proto_value(**fields), offset=2)
    batch = decode("otlp_proto", good, bad)
    assert batch.spans.num_rows == 3  # both spans of good, the ordinary span of bad
    [dead] = batch.dead_letters
    assert (dead.record, dead.reason) == (bad, "invalid_span")
    assert SPAN in dead.detail


@pytest.mark.parametrize(
    "fields",
    [
        {"startTimeUnixNano": str(2**64)},
        {"endTimeUnixNano": str(MAX_NS + 1)},
        {"startTimeUnixNano": "-5"},
        {"endTimeUnixNano": -1},
    ],
    ids=["start-2^64", "end-2^63", "start-negative", "end-negative-number"],
)
def test_json_timestamp_outside_int64_is_an_invalid_span(fields: dict[str, Any]) -> None:
    good, bad = Record(json_value(), offset=1), Record(json_value(**fields), offset=2)
    batch = decode("otlp_json", good, bad)
    assert batch.spans.num_rows == 3
    [dead] = batch.dead_letters
    assert (dead.record, dead.reason) == (bad, "invalid_span")


@pytest.mark.parametrize(
    "span_id",
    ["0x0123456789abcd", " 123456789abcdef", "+123456789abcdef", "0123_4567_89abcd", "0123456789abcdeg"],
)
def test_json_span_id_must_be_plain_hex(span_id: str) -> None:
    record = Record(json_value(spanId=span_id))
    batch = decode("otlp_json", record)
    assert batch.spans.column("span_id").to_pylist() == [OTHER_SPAN]
    [dead] = batch.dead_letters
    assert dead.reason == "invalid_span"


@pytest.mark.parametrize("trace_id", [" " + TRACE[1:], "0x" + TRACE[2:], TRACE + "\n"])
def test_json_trace_id_must_be_plain_hex(trace_id: str) -> None:
    batch = decode("otlp_json", Record(json_value(traceId=trace_id)))
    assert batch.spans.column("span_id").to_pylist() == [OTHER_SPAN]
    assert [d.reason for d in batch.dead_letters] == ["invalid_span"]


def test_uppercase_json_ids_are_normalised() -> None:
    batch = decode("otlp_json", Record(json_value(traceId=TRACE.upper(), spanId=SPAN.upper())))
    assert batch.dead_letters == []
    assert (first_row(batch)["trace_id"], first_row(batch)["span_id"]) == (TRACE, SPAN)
