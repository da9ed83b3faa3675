"""OTLP protobuf decoding: span fields, tenant resolution, keys and dead letters."""

from __future__ import annotations

from typing import Any, cast

import orjson
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, Span, Status

from betrace.errors import KeyDecodeError
from betrace.streams.otlp import DecodedBatch, OtlpDecoder, Record, check_key
from betrace.streams.schemas import SPAN_SCHEMA
from betrace.workload.generator import TraceGenerator
from betrace.workload.otlp import batch_messages

TRACE = bytes.fromhex("0af7651916cd43dd8448eb211c80319c")
ROOT = bytes.fromhex("b7ad6b7169203331")
CHILD = bytes.fromhex("00f067aa0ba902b7")
HEADER = "X-Scope-OrgID"


def _set(target: AnyValue, value: Any) -> None:
    if isinstance(value, bool):
        target.bool_value = value
    elif isinstance(value, int):
        target.int_value = value
    elif isinstance(value, float):
        target.double_value = value
    elif isinstance(value, bytes):
        target.bytes_value = value
    elif isinstance(value, list):
        for item in value:
            _set(target.array_value.values.add(), item)
    elif isinstance(value, dict):
        for key, item in value.items():
            kv: KeyValue = target.kvlist_value.values.add()
            kv.key = key
            _set(kv.value, item)
    else:
        target.string_value = value


def _attrs(target: Any, attrs: dict[str, Any]) -> None:
    for key, value in attrs.items():
        kv: KeyValue = target.add()
        kv.key = key
        _set(kv.value, value)


def add_resource(request: ExportTraceServiceRequest, **resource: Any) -> ResourceSpans:
    rs: ResourceSpans = request.resource_spans.add()
    _attrs(rs.resource.attributes, resource)
    rs.scope_spans.add().scope.name = "test"
    return rs


def add_span(
    rs: ResourceSpans,
    name: str,
    *,
    trace_id: bytes = TRACE,
    span_id: bytes = ROOT,
    parent: bytes = b"",
    kind: int = 0,
    status: int = 0,
    start: int = 1_000,
    end: int = 2_000,
    attrs: dict[str, Any] | None = None,
) -> Span:
    span: Span = rs.scope_spans[0].spans.add()
    span.trace_id, span.span_id, span.name = trace_id, span_id, name
    if parent:
        span.parent_span_id = parent
    span.kind = cast("Span.SpanKind.ValueType", kind)
    span.status.code = cast("Status.StatusCode.ValueType", status)
    span.start_time_unix_nano, span.end_time_unix_nano = start, end
    _attrs(span.attributes, attrs or {})
    return span


def one_span_request(tenant: str | None = None, **span: Any) -> bytes:
    request = ExportTraceServiceRequest()
    resource: dict[str, Any] = {"service.name": "checkout"}
    if tenant is not None:
        resource["tenant.id"] = tenant
    add_span(add_resource(request, **resource), "op", **span)
    data: bytes = request.SerializeToString()
    return data


def decode(*records: Record, default: str = "default") -> DecodedBatch:
    decoder = OtlpDecoder(encoding="otlp_proto", tenant_header=HEADER, default_tenant=default)
    return decoder.decode(records)


def test_decodes_every_span_field() -> None:
    request = ExportTraceServiceRequest()
    rs = add_resource(request, **{"service.name": "checkout", "host.cores": 8})
    add_span(rs, "root", kind=2, status=1, start=1_700_000_000_000_000_000, end=1_700_000_000_500_000_000)
    add_span(rs, "child", span_id=CHILD, parent=ROOT, kind=3, status=2, start=5, end=9)
    batch = decode(Record(request.SerializeToString(), timestamp_ms=1234))

    assert batch.records == 1
    assert batch.dead_letters == []
    assert batch.spans.schema == SPAN_SCHEMA
    root, child = batch.spans.to_pylist()
    assert root == {
        "tenant": "default",
        "trace_id": "0af7651916cd43dd8448eb211c80319c",
        "span_id": "b7ad6b7169203331",
        "parent_span_id": None,
        "name": "root",
        "service": "checkout",
        "kind": 2,
        "status_code": 1,
        "start_ns": 1_700_000_000_000_000_000,
        "end_ns": 1_700_000_000_500_000_000,
        "attributes": "{}",
        "resource_attributes": '{"service.name":"checkout","host.cores":8}',
        "produced_ms": 1234,
    }
    assert child["span_id"] == "00f067aa0ba902b7"
    assert child["parent_span_id"] == "b7ad6b7169203331"
    assert (child["kind"], child["status_code"], child["start_ns"], child["end_ns"]) == (3, 2, 5, 9)


def test_attribute_values_keep_their_json_types() -> None:
    attrs = {
        "s": "text",
        "i": -42,
        "big": 2**62,
        "f": 1.5,
        "b": True,
        "no": False,
        "arr": [1, "two", 3.0, [True]],
        "kv": {"inner": {"deep": 1}, "name": "x"},
        "raw": b"\x00\x01\xfe",
    }
    request = ExportTraceServiceRequest()
    span = add_span(add_resource(request), "op", attrs=attrs)
    span.attributes.add().key = "empty"  # an AnyValue with no value set
    row = decode(Record(request.SerializeToString())).spans.to_pylist()[0]

    decoded = orjson.loads(row["attributes"])
    assert decoded == {
        "s": "text",
        "i": -42,
        "big": 2**62,
        "f": 1.5,
        "b": True,
        "no": False,
        "arr": [1, "two", 3.0, [True]],
        "kv": {"inner": {"deep": 1}, "name": "x"},
        "raw": "0001fe",
        "empty": None,
    }
    assert isinstance(decoded["i"], int)
    assert isinstance(decoded["f"], float)
    assert decoded["b"] is True
    assert row["service"] is None  # no service.name resource attribute
    assert row["resource_attributes"] == "{}"


def test_non_string_service_name_is_dropped() -> None:
    request = ExportTraceServiceRequest()
    add_span(add_resource(request, **{"service.name": 7}), "op")
    row = decode(Record(request.SerializeToString())).spans.to_pylist()[0]
    assert row["service"] is None
    assert orjson.loads(row["resource_attributes"]) == {"service.name": 7}


def test_tenant_header_wins_over_resource_attribute() -> None:
    value = one_span_request(tenant="from-resource")
    batch = decode(Record(value, headers=[("other", b"x"), (HEADER, b"from-header")]))
    assert batch.spans.column("tenant").to_pylist() == ["from-header"]


def test_tenant_resource_attribute_wins_over_default() -> None:
    batch = decode(Record(one_span_request(tenant="acme")))
    assert batch.spans.column("tenant").to_pylist() == ["acme"]


@pytest.mark.parametrize(
    ("headers", "resource_tenant"),
    [
        ([], None),
        ([(HEADER, b"")], None),  # an empty header does not count
        ([("x-scope-orgid", b"other")], None),  # header names are matched exactly
        ([], 42),  # a non-string tenant.id is ignored
        ([], ""),
    ],
)
def test_default_tenant_when_nothing_names_one(
    headers: list[tuple[str, bytes]], resource_tenant: Any
) -> None:
    request = ExportTraceServiceRequest()
    resource = {} if resource_tenant is None else {"tenant.id": resource_tenant}
    add_span(add_resource(request, **resource), "op")
    batch = decode(Record(request.SerializeToString(), headers=headers), default="fallback")
    assert batch.spans.column("tenant").to_pylist() == ["fallback"]
    assert batch.dead_letters == []


def test_empty_header_falls_back_to_resource_tenant() -> None:
    batch = decode(Record(one_span_request(tenant="acme"), headers=[(HEADER, b"")]))
    assert batch.spans.column("tenant").to_pylist() == ["acme"]


@pytest.mark.parametrize(
    ("headers", "resource_tenant"),
    [
        ([(HEADER, b"bad tenant")], None),
        ([(HEADER, b"\xff\xfe")], None),
        ([(HEADER, b"a" * 65)], None),
        ([], "acme/../etc"),
    ],
)
def test_invalid_tenant_dead_letters_the_whole_record(
    headers: list[tuple[str, bytes]], resource_tenant: str | None
) -> None:
    good = Record(one_span_request(), offset=1)
    request = ExportTraceServiceRequest()
    # The first resource is fine; the record must still be dropped whole.
    add_span(add_resource(request, **{"tenant.id": "fine"}), "first")
    resource = {} if resource_tenant is None else {"tenant.id": resource_tenant}
    add_span(add_resource(request, **resource), "second", span_id=CHILD)
    bad = Record(request.SerializeToString(), headers=headers, offset=2)

    batch = decode(good, bad)
    assert batch.records == 2
    assert batch.spans.column("name").to_pylist() == ["op"]
    [dead] = batch.dead_letters
    assert dead.record is bad
    assert dead.reason == "invalid_value"
    assert "tenant" in dead.detail


@pytest.mark.parametrize(
    ("trace_id", "span_id"),
    [
        (bytes(16), ROOT),  # zero trace id
        (TRACE[:8], ROOT),  # short trace id
        (b"", ROOT),
        (TRACE, bytes(8)),  # zero span id
        (TRACE, ROOT[:4]),  # short span id
        (TRACE, ROOT + b"\x01"),  # long span id
    ],
)
def test_invalid_ids_keep_valid_spans_and_dead_letter_record(trace_id: bytes, span_id: bytes) -> None:
    request = ExportTraceServiceRequest()
    rs = add_resource(request, **{"service.name": "svc"})
    add_span(rs, "good-1")
    add_span(rs, "broken", trace_id=trace_id, span_id=span_id)
    add_span(rs, "good-2", span_id=CHILD)
    record = Record(request.SerializeToString())

    batch = decode(record)
    assert batch.spans.column("name").to_pylist() == ["good-1", "good-2"]
    [dead] = batch.dead_letters
    assert dead.record is record
    assert dead.reason == "invalid_span"
    assert "'broken'" in dead.detail


def test_invalid_span_detail_lists_at_most_ten_problems() -> None:
    request = ExportTraceServiceRequest()
    rs = add_resource(request)
    for i in range(15):
        add_span(rs, f"bad-{i}", trace_id=bytes(16))
    [dead] = decode(Record(request.SerializeToString())).dead_letters
    assert dead.detail.count("invalid trace_id") == 10


@pytest.mark.parametrize("value", [b"\xff\xff\xff\xff", b"\x0a\x05abc", b"not protobuf at all \x00\x01"])
def test_garbage_value_is_invalid_value(value: bytes) -> None:
    record = Record(value)
    batch = decode(record, Record(one_span_request()))
    assert batch.spans.num_rows == 1
    [dead] = batch.dead_letters
    assert (dead.record, dead.reason) == (record, "invalid_value")
    assert "protobuf" in dead.detail


@pytest.mark.parametrize("value", [b"", None])
def test_empty_value_is_invalid_value(value: bytes | None) -> None:
    [dead] = decode(Record(value)).dead_letters
    assert dead.reason == "invalid_value"
    assert dead.detail == "empty record value"


def test_request_without_spans_is_neither_rows_nor_dead_letter() -> None:
    request = ExportTraceServiceRequest()
    add_resource(request, **{"service.name": "idle"})
    batch = decode(Record(request.SerializeToString()))
    assert (batch.records, batch.spans.num_rows, batch.dead_letters) == (1, 0, [])


@pytest.mark.parametrize(
    "key",
    [None, b"", TRACE, TRACE.hex().encode(), TRACE.hex().upper().encode(), bytes(16)],
)
def test_accepted_keys(key: bytes | None) -> None:
    check_key(key)
    batch = decode(Record(one_span_request(), key=key))
    assert (batch.spans.num_rows, batch.dead_letters) == (1, [])


@pytest.mark.parametrize(
    "key",
    [b"trace-1", TRACE[:15], TRACE + b"\x00", b"g" * 32, TRACE.hex().encode()[:31], b"\xff" * 32],
)
def test_key_that_is_not_a_trace_id_is_invalid_key(key: bytes) -> None:
    with pytest.raises(KeyDecodeError):
        check_key(key)
    record = Record(one_span_request(), key=key)
    batch = decode(record)
    assert batch.spans.num_rows == 0
    [dead] = batch.dead_letters
    assert (dead.record, dead.reason) == (record, "invalid_key")


def test_unknown_encoding_is_rejected() -> None:
    with pytest.raises(ValueError, match="otlp_avro"):
        OtlpDecoder(encoding="otlp_avro", tenant_header=HEADER, default_tenant="default")


def test_workload_messages_decode_completely() -> None:
    generator = TraceGenerator(tenants=("default", "acme"), violation_rate=0.2, seed=3)
    messages = list(batch_messages(generator.traces(600), spans_per_message=50))
    records = [Record(m.value, key=m.key, timestamp_ms=i) for i, m in enumerate(messages)]
    batch = decode(*records)

    assert batch.dead_letters == []
    assert batch.records == len(messages)
    assert batch.spans.num_rows == generator.truth.spans == sum(m.spans for m in messages)
    rows = batch.spans.to_pylist()
    assert {r["tenant"] for r in rows} == {"default", "acme"}
    assert len({(r["trace_id"], r["span_id"]) for r in rows}) == len(rows)
    roots = [r for r in rows if r["parent_span_id"] is None]
    assert len(roots) == generator.truth.traces
    assert all(r["name"] == "http.request" for r in roots)
