"""OTLP/JSON decoding: same rows as protobuf, malformed documents are dead letters."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from betrace.streams.otlp import DecodedBatch, OtlpDecoder, Record

HEADER = "X-Scope-OrgID"
TRACE = "5b8efff798038103d269b633813fc60c"
ROOT = "eee19b7ec3c1b174"
CHILD = "eee19b7ec3c1b173"
START = 1_544_712_660_000_000_000


def decode(encoding: str, *records: Record) -> DecodedBatch:
    decoder = OtlpDecoder(encoding=encoding, tenant_header=HEADER, default_tenant="default")
    return decoder.decode(records)


def proto_request() -> bytes:
    """Two resources, three spans, every attribute type except bytes."""
    request = ExportTraceServiceRequest()
    rs = request.resource_spans.add()
    for key, value in (("service.name", "frontend"), ("tenant.id", "acme")):
        kv = rs.resource.attributes.add()
        kv.key = key
        kv.value.string_value = value
    spans = rs.scope_spans.add().spans
    root = spans.add()
    root.trace_id, root.span_id, root.name = bytes.fromhex(TRACE), bytes.fromhex(ROOT), "GET /cart"
    root.kind, root.status.code = 2, 1
    root.start_time_unix_nano, root.end_time_unix_nano = START, START + 2**40
    scalars: list[tuple[str, str, Any]] = [
        ("http.status_code", "int_value", 200),
        ("big", "int_value", -(2**63)),
        ("ratio", "double_value", 0.25),
        ("cached", "bool_value", False),
        ("name", "string_value", "é ü"),
    ]
    for key, field, value in scalars:
        kv = root.attributes.add()
        kv.key = key
        setattr(kv.value, field, value)
    arr = root.attributes.add()
    arr.key = "tags"
    arr.value.array_value.values.add().string_value = "a"
    arr.value.array_value.values.add().int_value = 2
    kvl = root.attributes.add()
    kvl.key = "map"
    inner = kvl.value.kvlist_value.values.add()
    inner.key = "k"
    inner.value.bool_value = True
    child = spans.add()
    child.trace_id, child.span_id, child.name = bytes.fromhex(TRACE), bytes.fromhex(CHILD), "db"
    child.parent_span_id = bytes.fromhex(ROOT)
    child.kind, child.status.code = 3, 2
    child.start_time_unix_nano, child.end_time_unix_nano = START + 10, START + 20
    other = request.resource_spans.add()
    svc = other.resource.attributes.add()
    svc.key, svc.value.string_value = "service.name", "worker"
    lone = other.scope_spans.add().spans.add()
    lone.trace_id, lone.span_id, lone.name = bytes.fromhex("ab" * 16), bytes.fromhex("cd" * 8), "job"
    lone.kind = 5
    data: bytes = request.SerializeToString()
    return data


def json_request(*, enum_names: bool, upper_ids: bool = False) -> dict[str, Any]:
    """The same request as :func:`proto_request`, written as OTLP/JSON by hand."""

    def hexid(value: str) -> str:
        return value.upper() if upper_ids else value

    def kind(name: str, number: int) -> Any:
        return name if enum_names else number

    return {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [
                        {"key": "service.name", "value": {"stringValue": "frontend"}},
                        {"key": "tenant.id", "value": {"stringValue": "acme"}},
                    ]
                },
                "scopeSpans": [
                    {
                        "scope": {"name": "test"},
                        "spans": [
                            {
                                "traceId": hexid(TRACE),
                                "spanId": hexid(ROOT),
                                "parentSpanId": "",
                                "name": "GET /cart",
                                "kind": kind("SPAN_KIND_SERVER", 2),
                                "startTimeUnixNano": str(START),
                                "endTimeUnixNano": str(START + 2**40),
                                "attributes": [
                                    {"key": "http.status_code", "value": {"intValue": "200"}},
                                    {"key": "big", "value": {"intValue": str(-(2**63))}},
                                    {"key": "ratio", "value": {"doubleValue": 0.25}},
                                    {"key": "cached", "value": {"boolValue": False}},
                                    {"key": "name", "value": {"stringValue": "é ü"}},
                                    {
                                        "key": "tags",
                                        "value": {
                                            "arrayValue": {"values": [{"stringValue": "a"}, {"intValue": 2}]}
                                        },
                                    },
                                    {
                                        "key": "map",
                                        "value": {
                                            "kvlistValue": {
                                                "values": [{"key": "k", "value": {"boolValue": True}}]
                                            }
                                        },
                                    },
                                ],
                                "status": {"code": kind("STATUS_CODE_OK", 1)},
                            },
                            {
                                "traceId": hexid(TRACE),
                                "spanId": hexid(CHILD),
                                "parentSpanId": hexid(ROOT),
                                "name": "db",
                                "kind": kind("SPAN_KIND_CLIENT", 3),
                                "startTimeUnixNano": str(START + 10),
                                "endTimeUnixNano": str(START + 20),
                                "status": {"code": kind("STATUS_CODE_ERROR", 2)},
                            },
                        ],
                    }
                ],
            },
            {
                "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "worker"}}]},
                "scopeSpans": [
                    {
                        "spans": [
                            {
                                "traceId": "ab" * 16,
                                "spanId": "cd" * 8,
                                "name": "job",
                                "kind": kind("SPAN_KIND_CONSUMER", 5),
                                "startTimeUnixNano": "0",
                                "endTimeUnixNano": "0",
                                "status": {},
                            }
                        ]
                    }
                ],
            },
        ]
    }


@pytest.mark.parametrize(("enum_names", "upper_ids"), [(True, False), (False, False), (True, True)])
def test_json_gives_the_same_rows_as_protobuf(enum_names: bool, upper_ids: bool) -> None:
    from_proto = decode("otlp_proto", Record(proto_request(), timestamp_ms=99))
    doc = orjson.dumps(json_request(enum_names=enum_names, upper_ids=upper_ids))
    from_json = decode("otlp_json", Record(doc, timestamp_ms=99))

    assert from_proto.dead_letters == from_json.dead_letters == []
    assert from_json.spans.num_rows == 3
    assert from_json.spans.equals(from_proto.spans)
    assert from_json.spans.to_pylist() == from_proto.spans.to_pylist()


def test_json_row_values() -> None:
    rows = decode("otlp_json", Record(orjson.dumps(json_request(enum_names=True)))).spans.to_pylist()
    root, child, lone = rows
    assert root["tenant"] == child["tenant"] == "acme"
    assert lone["tenant"] == "default"
    assert (root["kind"], root["status_code"], root["parent_span_id"]) == (2, 1, None)
    assert (child["kind"], child["status_code"], child["parent_span_id"]) == (3, 2, ROOT)
    assert (lone["kind"], lone["status_code"], lone["service"]) == (5, 0, "worker")
    assert root["end_ns"] - root["start_ns"] == 2**40
    assert orjson.loads(root["attributes"]) == {
        "http.status_code": 200,
        "big": -(2**63),
        "ratio": 0.25,
        "cached": False,
        "name": "é ü",
        "tags": ["a", 2],
        "map": {"k": True},
    }


def test_unknown_enum_name_maps_to_zero() -> None:
    doc = json_request(enum_names=True)
    span = doc["resourceSpans"][1]["scopeSpans"][0]["spans"][0]
    span["kind"], span["status"] = "SPAN_KIND_MADE_UP", {"code": "STATUS_CODE_MAYBE"}
    row = decode("otlp_json", Record(orjson.dumps(doc))).spans.to_pylist()[2]
    assert (row["kind"], row["status_code"]) == (0, 0)


def test_json_header_tenant_wins() -> None:
    record = Record(orjson.dumps(json_request(enum_names=True)), headers=[(HEADER, b"team-9")])
    assert set(decode("otlp_json", record).spans.column("tenant").to_pylist()) == {"team-9"}


def test_json_invalid_ids_keep_valid_spans() -> None:
    doc = json_request(enum_names=False)
    spans = doc["resourceSpans"][0]["scopeSpans"][0]["spans"]
    spans.append({"traceId": "0" * 32, "spanId": "ab" * 8, "name": "zero-trace"})
    spans.append({"traceId": TRACE, "spanId": "abc", "name": "short-span"})
    spans.append({"traceId": TRACE, "spanId": "zz" * 8, "name": "not-hex"})
    spans.append({"traceId": TRACE[:30], "spanId": "ab" * 8, "name": "short-trace"})
    spans.append({"spanId": "ab" * 8, "name": "no-trace"})
    record = Record(orjson.dumps(doc))
    batch = decode("otlp_json", record)
    assert batch.spans.column("name").to_pylist() == ["GET /cart", "db", "job"]
    [dead] = batch.dead_letters
    assert (dead.record, dead.reason) == (record, "invalid_span")
    for name in ("zero-trace", "short-span", "not-hex", "short-trace", "no-trace"):
        assert repr(name) in dead.detail


@pytest.mark.parametrize(
    "value",
    [
        b"{not json",
        b"[]",
        b"42",
        b'"resourceSpans"',
        b'{"resourceSpans": {}}',
        b'{"resourceSpans": "x"}',
        b'{"resourceSpans": [1]}',
        b'{"resourceSpans": [{"scopeSpans": 5}]}',
        b'{"resourceSpans": [{"scopeSpans": [{"spans": [7]}]}]}',
        b'{"resourceSpans": [{"resource": {"attributes": [{"value": {}}]}}]}',
        b'{"resourceSpans": [{"resource": {"attributes": [{"key": "a", "value": 3}]}}]}',
        b'{"resourceSpans": [{"resource": {"attributes": [{"key": 1, "value": {"intValue": "1"}}]}}]}',
        b'{"resourceSpans": [{"resource": {"attributes": [{"key": "tenant.id",'
        b' "value": {"stringValue": "no spaces please"}}]}}]}',
    ],
)
def test_malformed_json_is_invalid_value(value: bytes) -> None:
    good = Record(orjson.dumps(json_request(enum_names=True)))
    record = Record(value)
    batch = decode("otlp_json", good, record)
    assert batch.spans.num_rows == 3
    [dead] = batch.dead_letters
    assert (dead.record, dead.reason) == (record, "invalid_value")


@pytest.mark.parametrize(
    "span_patch",
    [
        {"startTimeUnixNano": "soon"},
        {"endTimeUnixNano": [1]},
        {"kind": None},
        {"status": "ok"},
        {"attributes": {"a": 1}},
        {"attributes": [{"key": "a", "value": {"intValue": "1.5x"}}]},
        {"attributes": [{"key": "a", "value": {"intValue": str(2**70)}}]},
        {"attributes": [{"key": "a", "value": {"arrayValue": {"values": [3]}}}]},
        {"attributes": [{"key": "a", "value": {"kvlistValue": {"values": [{"value": {}}]}}}]},
    ],
)
def test_malformed_span_fields_drop_the_record_not_the_batch(span_patch: dict[str, Any]) -> None:
    doc = json_request(enum_names=True)
    doc["resourceSpans"][1]["scopeSpans"][0]["spans"][0].update(span_patch)
    record = Record(orjson.dumps(doc))
    good = Record(orjson.dumps(json_request(enum_names=False)))
    batch = decode("otlp_json", good, record)
    # The record's earlier, valid spans are withdrawn with it.
    assert batch.spans.num_rows == 3
    [dead] = batch.dead_letters
    assert (dead.record, dead.reason) == (record, "invalid_value")
    assert dead.detail.startswith("malformed OTLP/JSON request")


def test_json_empty_request_and_empty_value() -> None:
    batch = decode("otlp_json", Record(b"{}"), Record(b'{"resourceSpans": []}'), Record(b""))
    assert batch.records == 3
    assert batch.spans.num_rows == 0
    assert [d.reason for d in batch.dead_letters] == ["invalid_value"]


def test_bytes_attribute_is_the_same_in_both_encodings() -> None:
    raw = b"\x00\x01\xfe\xff"
    request = ExportTraceServiceRequest()
    span = request.resource_spans.add().scope_spans.add().spans.add()
    span.trace_id, span.span_id, span.name = bytes.fromhex(TRACE), bytes.fromhex(ROOT), "op"
    kv = span.attributes.add()
    kv.key, kv.value.bytes_value = "raw", raw
    doc = {
        "resourceSpans": [
            {
                "scopeSpans": [
                    {
                        "spans": [
                            {
                                "traceId": TRACE,
                                "spanId": ROOT,
                                "name": "op",
                                "startTimeUnixNano": "0",
                                "endTimeUnixNano": "0",
                                "attributes": [
                                    {"key": "raw", "value": {"bytesValue": base64.b64encode(raw).decode()}}
                                ],
                            }
                        ]
                    }
                ]
            }
        ]
    }
    proto_rows = decode("otlp_proto", Record(request.SerializeToString())).spans
    json_rows = decode("otlp_json", Record(orjson.dumps(doc))).spans
    assert json_rows.column("attributes").to_pylist() == proto_rows.column("attributes").to_pylist()
