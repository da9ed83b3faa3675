"""OTLP/HTTP bodies: parsing, per-trace split, re-encoding for the input topic, reply bodies."""

from __future__ import annotations

import base64
import gzip

import orjson
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from betrace.receiver import codec
from betrace.streams.otlp import OtlpDecoder, Record
from betrace.workload.generator import TraceGenerator
from betrace.workload.otlp import encode_request


def _request(traces: int = 3, seed: int = 5) -> tuple[ExportTraceServiceRequest, int]:
    gen = TraceGenerator(tenants=("acme",), violation_rate=0.5, seed=seed)
    specs = list(gen.traces(traces * 6))[:traces]
    return encode_request(specs), sum(len(t.spans) for t in specs)


def _otlp_json(request: ExportTraceServiceRequest) -> bytes:
    """OTLP/JSON as SDKs send it: camelCase, hex ids."""
    doc = MessageToDict(request)
    for rs in doc["resourceSpans"]:
        for ss in rs["scopeSpans"]:
            for span in ss["spans"]:
                for name in ("traceId", "spanId", "parentSpanId"):
                    if name in span:
                        span[name] = base64.b64decode(span[name]).hex()
    return orjson.dumps(doc)


def _decode(records: list[codec.TraceRecord], encoding: str) -> list[tuple[str, str]]:
    decoder = OtlpDecoder(encoding=encoding, tenant_header="X-Scope-OrgID", default_tenant="default")
    batch = decoder.decode([Record(r.value, r.key, [("X-Scope-OrgID", b"acme")]) for r in records])
    assert batch.dead_letters == []
    return sorted(zip(batch.spans["trace_id"].to_pylist(), batch.spans["span_id"].to_pylist(), strict=True))


def _span_keys(request: ExportTraceServiceRequest) -> list[tuple[str, str]]:
    return sorted(
        (s.trace_id.hex(), s.span_id.hex())
        for rs in request.resource_spans
        for ss in rs.scope_spans
        for s in ss.spans
    )


@pytest.mark.parametrize("encoding", ["otlp_proto", "otlp_json"])
def test_protobuf_body_splits_into_one_record_per_trace_keyed_by_trace_id(encoding: str) -> None:
    request, spans = _request(traces=4)
    parsed = codec.parse_request(request.SerializeToString(), codec.PROTOBUF)
    split = codec.split_by_trace(parsed, encoding)
    assert split.accepted == spans and split.rejected == 0
    trace_ids = {s.trace_id.hex() for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans}
    assert sorted(r.key.decode() for r in split.records) == sorted(trace_ids)
    assert sum(r.spans for r in split.records) == spans
    # The pipeline's own decoder reads back exactly the spans that were sent.
    assert _decode(split.records, encoding) == _span_keys(request)


def test_otlp_json_body_with_hex_ids_is_the_same_request_as_protobuf() -> None:
    request, spans = _request(traces=2)
    parsed = codec.parse_request(_otlp_json(request), codec.JSON)
    assert parsed == request
    split = codec.split_by_trace(parsed, "otlp_proto")
    assert split.accepted == spans


def test_invalid_spans_are_rejected_with_reasons_and_the_rest_kept() -> None:
    request, spans = _request(traces=2)
    first = request.resource_spans[0].scope_spans[0].spans
    first[0].trace_id = bytes(16)
    first[1].span_id = b"\x01\x02"
    split = codec.split_by_trace(request, "otlp_proto")
    assert split.rejected == 2 and split.accepted == spans - 2
    assert "trace_id" in split.error_message and "span_id" in split.error_message
    body = codec.success_body(split, codec.PROTOBUF)
    response = ExportTraceServiceResponse()
    response.ParseFromString(body)
    assert response.partial_success.rejected_spans == 2
    assert "trace_id" in response.partial_success.error_message
    as_json = orjson.loads(codec.success_body(split, codec.JSON))
    assert as_json["partialSuccess"]["rejectedSpans"] == "2"


def test_full_success_has_no_partial_success() -> None:
    request, _ = _request(traces=1)
    split = codec.split_by_trace(request, "otlp_proto")
    response = ExportTraceServiceResponse()
    response.ParseFromString(codec.success_body(split, codec.PROTOBUF))
    assert not response.HasField("partial_success")
    assert orjson.loads(codec.success_body(split, codec.JSON)) == {}


@pytest.mark.parametrize(
    ("body", "ctype", "needle"),
    [
        (b"\xff\xff\xff", codec.PROTOBUF, "protobuf"),
        (b"{not json", codec.JSON, "not valid JSON"),
        (b"[1, 2]", codec.JSON, "expected an object"),
        (
            b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"startTimeUnixNano": "soon"}]}]}]}',
            codec.JSON,
            "OTLP/JSON",
        ),
        (b'{"resourceSpans": 7}', codec.JSON, "OTLP/JSON"),
    ],
)
def test_malformed_bodies_raise_400_with_a_reason(body: bytes, ctype: str, needle: str) -> None:
    with pytest.raises(codec.BodyError) as info:
        codec.parse_request(body, ctype)
    assert info.value.status == 400
    assert needle in info.value.reason


def test_gunzip_inflates_and_enforces_the_limit_on_the_inflated_size() -> None:
    raw = b"x" * 100_000
    assert codec.gunzip(gzip.compress(raw), 100_000) == raw
    with pytest.raises(codec.BodyError) as too_big:
        codec.gunzip(gzip.compress(raw), 99_999)  # a small body that inflates past the limit
    assert too_big.value.status == 413
    with pytest.raises(codec.BodyError) as bad:
        codec.gunzip(b"not gzip at all", 1000)
    assert bad.value.status == 400
    with pytest.raises(codec.BodyError) as truncated:
        codec.gunzip(gzip.compress(raw)[:-20], 200_000)
    assert truncated.value.status == 400


def _status_class() -> type:
    """google.rpc.Status built from its .proto definition (googleapis-common-protos is not installed)."""
    fdp = descriptor_pb2.FileDescriptorProto(
        name="test_rpc_status.proto", package="test.rpc", syntax="proto3"
    )
    msg = fdp.message_type.add(name="Status")
    msg.field.add(name="code", number=1, type=5, label=1)  # int32
    msg.field.add(name="message", number=2, type=9, label=1)  # string
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("test.rpc.Status"))


def test_status_body_is_a_google_rpc_status() -> None:
    status_cls = _status_class()
    reason = "the body exceeds the limit of 1024 bytes " + "é" * 100  # multi-byte length prefix
    status = status_cls()
    status.ParseFromString(codec.status_body(codec.CODE_UNAVAILABLE, reason, codec.PROTOBUF))
    assert status.code == codec.CODE_UNAVAILABLE
    assert status.message == reason
    assert orjson.loads(codec.status_body(3, "bad", codec.JSON)) == {"code": 3, "message": "bad"}


def test_media_type_ignores_parameters_and_case() -> None:
    assert codec.media_type("Application/JSON; charset=utf-8") == codec.JSON
    assert codec.media_type(None) == ""
