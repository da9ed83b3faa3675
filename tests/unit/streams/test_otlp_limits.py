"""Field values outside the column types, and loosely parsed ids.

Protobuf enums are open and ``fixed64`` timestamps are unsigned, so a
well-formed OTLP record can carry a span kind, status code or timestamp that
does not fit ``SPAN_SCHEMA`` (int8 / int64). Such a record must be dead
lettered like any other bad record; it must not fail the whole batch.
"""

from __future__ import annotations

from typing import Any

import orjson
import pyarrow as pa
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from betrace.streams.otlp import DecodedBatch, OtlpDecoder, Record

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
DECODE_CRASH = (
    "OtlpDecoder.decode builds the Arrow table after the per-record try/except, so a value that does "
    "not fit the int8/int64 columns raises ArrowInvalid/OverflowError out of decode() and fails every "
    "record of the batch (a poison pill for the ingest agent) instead of dead-lettering one record"
)


def decode(encoding: str, *records: Record) -> DecodedBatch:
    return OtlpDecoder(encoding=encoding, tenant_header="X-Scope-OrgID", default_tenant="d").decode(records)


def proto_value(**fields: int) -> bytes:
    request = ExportTraceServiceRequest()
    span = request.resource_spans.add().scope_spans.add().spans.add()
    span.trace_id, span.span_id, span.name = bytes.fromhex(TRACE), bytes.fromhex(SPAN), "op"
    span.kind = fields.get("kind", 1)
    span.status.code = fields.get("status", 0)
    span.start_time_unix_nano = fields.get("start", 10)
    span.end_time_unix_nano = fields.get("end", 20)
    return request.SerializeToString()


def json_value(**span: Any) -> bytes:
    doc = {"traceId": TRACE, "spanId": SPAN, "name": "op", "startTimeUnixNano": "10", "endTimeUnixNano": "20"}
    doc.update(span)
    return orjson.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [doc]}]}]})


@pytest.mark.parametrize(("kind", "status"), [(0, 0), (127, 127), (-1, -128), (9, 3)])
def test_proto_kind_and_status_within_int8_are_kept(kind: int, status: int) -> None:
    batch = decode("otlp_proto", Record(proto_value(kind=kind, status=status)))
    assert batch.dead_letters == []
    assert batch.spans.to_pylist()[0]["kind"] == kind
    assert batch.spans.to_pylist()[0]["status_code"] == status


def test_proto_largest_signed_timestamp_is_kept() -> None:
    batch = decode("otlp_proto", Record(proto_value(start=2**63 - 1, end=2**63 - 1)))
    assert batch.spans.column("end_ns").to_pylist() == [2**63 - 1]


@pytest.mark.xfail(strict=True, raises=(pa.ArrowInvalid, OverflowError), reason=DECODE_CRASH)
@pytest.mark.parametrize(
    "fields",
    [{"kind": 200}, {"status": 500}, {"start": 2**63}, {"end": 2**64 - 1}],
    ids=["kind-200", "status-500", "start-2^63", "end-2^64-1"],
)
def test_proto_out_of_range_value_dead_letters_one_record(fields: dict[str, int]) -> None:
    good, bad = Record(proto_value(), offset=1), Record(proto_value(**fields), offset=2)
    batch = decode("otlp_proto", good, bad)
    assert batch.spans.num_rows == 1
    assert [d.record for d in batch.dead_letters] == [bad]


@pytest.mark.xfail(strict=True, raises=(pa.ArrowInvalid, OverflowError), reason=DECODE_CRASH)
@pytest.mark.parametrize(
    "span",
    [
        {"kind": 1000},
        {"status": {"code": 300}},
        {"startTimeUnixNano": str(2**64)},
        {"endTimeUnixNano": str(2**63)},
    ],
    ids=["kind-1000", "status-300", "start-2^64", "end-2^63"],
)
def test_json_out_of_range_value_dead_letters_one_record(span: dict[str, Any]) -> None:
    good, bad = Record(json_value(), offset=1), Record(json_value(**span), offset=2)
    batch = decode("otlp_json", good, bad)
    assert batch.spans.num_rows == 1
    assert [d.record for d in batch.dead_letters] == [bad]


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="otlp._is_hex uses int(text, 16), which accepts a '0x' prefix, a sign, surrounding "
    "whitespace and '_' separators, so 16-character OTLP/JSON spanIds that are not hex are stored",
)
@pytest.mark.parametrize(
    "span_id", ["0x0123456789abcd", " 123456789abcdef", "+123456789abcdef", "0123_4567_89abcd"]
)
def test_json_span_id_must_be_plain_hex(span_id: str) -> None:
    record = Record(json_value(spanId=span_id))
    batch = decode("otlp_json", record)
    assert batch.spans.num_rows == 0
    assert [d.reason for d in batch.dead_letters] == ["invalid_span"]
