"""OTLP/HTTP bodies: decode protobuf or JSON requests, split them per trace, encode replies.

The receiver re-encodes what it accepts in the input topic's encoding
(``otlp_proto`` or ``otlp_json``), one Kafka record per trace keyed by the
hex trace id, as the Collector's Kafka exporter does with
``partition_traces_by_id``. Spans without a valid trace or span id are dropped
here and reported back as ``partial_success.rejected_spans``.
"""

from __future__ import annotations

import base64
import binascii
import zlib
from dataclasses import dataclass, field
from typing import Any

import orjson
from google.protobuf import json_format
from google.protobuf.message import DecodeError as ProtobufDecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
CONTENT_TYPES = (PROTOBUF, JSON)
GZIP_MAGIC = b"\x1f\x8b"

# google.rpc.Code values used in Status bodies (the gRPC codes OTLP maps to HTTP).
CODE_INVALID_ARGUMENT = 3
CODE_RESOURCE_EXHAUSTED = 8
CODE_UNAVAILABLE = 14
CODE_UNIMPLEMENTED = 12

_ID_FIELDS = ("traceId", "spanId", "parentSpanId")
_ZERO_TRACE = bytes(16)
_ZERO_SPAN = bytes(8)


class BodyError(Exception):
    """The request cannot be accepted; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(slots=True)
class TraceRecord:
    """One Kafka record: every accepted span of one trace."""

    key: bytes
    value: bytes
    spans: int


@dataclass(slots=True)
class SplitRequest:
    records: list[TraceRecord] = field(default_factory=list)
    accepted: int = 0
    rejected: int = 0
    reasons: list[str] = field(default_factory=list)

    @property
    def error_message(self) -> str:
        return "; ".join(self.reasons[:5])


def media_type(content_type: str | None) -> str:
    """``application/json; charset=utf-8`` → ``application/json``."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def gunzip(body: bytes, limit: int) -> bytes:
    """Inflate a gzip body, refusing (413) to produce more than ``limit`` bytes."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        msg = f"Content-Encoding is gzip but the body is not valid gzip: {exc}"
        raise BodyError(400, msg) from None
    if len(out) > limit:
        msg = f"the decompressed body exceeds the limit of {limit} bytes"
        raise BodyError(413, msg)
    if not inflater.eof:
        msg = "the gzip body is truncated"
        raise BodyError(400, msg)
    return out


def _hex_ids_to_base64(node: Any) -> None:
    """OTLP/JSON writes ids as hex; protobuf's JSON mapping expects base64 for bytes."""
    for resource_spans in node.get("resourceSpans") or ():
        for scope_spans in resource_spans.get("scopeSpans") or ():
            for span in scope_spans.get("spans") or ():
                for name in _ID_FIELDS:
                    value = span.get(name)
                    if isinstance(value, str) and value:
                        try:
                            span[name] = base64.b64encode(bytes.fromhex(value)).decode()
                        except ValueError:
                            # Left for the id check below, which rejects the span with a reason.
                            span[name] = base64.b64encode(value.encode()[:1]).decode()
                for link in span.get("links") or ():
                    for name in ("traceId", "spanId"):
                        value = link.get(name)
                        if isinstance(value, str) and value:
                            try:
                                link[name] = base64.b64encode(bytes.fromhex(value)).decode()
                            except ValueError:
                                link[name] = ""


def _base64_ids_to_hex(node: Any) -> None:
    for resource_spans in node.get("resourceSpans") or ():
        for scope_spans in resource_spans.get("scopeSpans") or ():
            for span in scope_spans.get("spans") or ():
                for name in _ID_FIELDS:
                    if span.get(name):
                        span[name] = base64.b64decode(span[name]).hex()
                for link in span.get("links") or ():
                    for name in ("traceId", "spanId"):
                        if link.get(name):
                            link[name] = base64.b64decode(link[name]).hex()


def parse_request(body: bytes, content_type: str) -> ExportTraceServiceRequest:
    """An ``ExportTraceServiceRequest`` from a protobuf or OTLP/JSON body (400 if malformed)."""
    request = ExportTraceServiceRequest()
    if content_type == PROTOBUF:
        try:
            request.ParseFromString(body)
        except (ProtobufDecodeError, RuntimeError) as exc:
            msg = f"the body is not a protobuf ExportTraceServiceRequest: {exc}"
            raise BodyError(400, msg) from None
        return request
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        msg = f"the body is not valid JSON: {exc}"
        raise BodyError(400, msg) from None
    if not isinstance(doc, dict):
        msg = (
            "the body is not an OTLP/JSON ExportTraceServiceRequest: expected an object with 'resourceSpans'"
        )
        raise BodyError(400, msg)
    try:
        _hex_ids_to_base64(doc)
        json_format.ParseDict(doc, request, ignore_unknown_fields=True)
    except (json_format.ParseError, AttributeError, TypeError, ValueError, binascii.Error) as exc:
        msg = f"the body is not an OTLP/JSON ExportTraceServiceRequest: {exc}"
        raise BodyError(400, msg) from None
    return request


def _span_problem(span: Any) -> str | None:
    if len(span.trace_id) != 16 or span.trace_id == _ZERO_TRACE:
        return f"span {span.name[:60]!r}: trace_id must be 16 bytes, not all zero"
    if len(span.span_id) != 8 or span.span_id == _ZERO_SPAN:
        return f"span {span.name[:60]!r}: span_id must be 8 bytes, not all zero"
    return None


def split_by_trace(request: ExportTraceServiceRequest, encoding: str) -> SplitRequest:
    """One record per trace id, resource and scope kept; invalid spans counted as rejected."""
    result = SplitRequest()
    per_trace: dict[bytes, ExportTraceServiceRequest] = {}
    counts: dict[bytes, int] = {}
    for resource_spans in request.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            # (trace id) -> the ScopeSpans of this resource/scope inside that trace's request
            targets: dict[bytes, ScopeSpans] = {}
            for span in scope_spans.spans:
                problem = _span_problem(span)
                if problem is not None:
                    result.rejected += 1
                    if len(result.reasons) < 10:
                        result.reasons.append(problem)
                    continue
                target = targets.get(span.trace_id)
                if target is None:
                    out = per_trace.get(span.trace_id)
                    if out is None:
                        out = per_trace[span.trace_id] = ExportTraceServiceRequest()
                        counts[span.trace_id] = 0
                    rs: ResourceSpans = out.resource_spans.add()
                    rs.resource.CopyFrom(resource_spans.resource)
                    rs.schema_url = resource_spans.schema_url
                    target = rs.scope_spans.add()
                    target.scope.CopyFrom(scope_spans.scope)
                    target.schema_url = scope_spans.schema_url
                    targets[span.trace_id] = target
                target.spans.add().CopyFrom(span)
                counts[span.trace_id] += 1
    for trace_id, out in per_trace.items():
        result.records.append(
            TraceRecord(trace_id.hex().encode(), encode_request(out, encoding), counts[trace_id])
        )
        result.accepted += counts[trace_id]
    return result


def encode_request(request: ExportTraceServiceRequest, encoding: str) -> bytes:
    """The input topic's encoding: protobuf, or OTLP/JSON with hex ids."""
    if encoding == "otlp_proto":
        return bytes(request.SerializeToString())
    doc = json_format.MessageToDict(request, preserving_proto_field_name=False)
    _base64_ids_to_hex(doc)
    return orjson.dumps(doc)


def success_body(split: SplitRequest, content_type: str) -> bytes:
    """``ExportTraceServiceResponse``; ``partial_success`` only when spans were rejected."""
    response = ExportTraceServiceResponse()
    if split.rejected:
        response.partial_success.rejected_spans = split.rejected
        response.partial_success.error_message = split.error_message
    if content_type == PROTOBUF:
        return bytes(response.SerializeToString())
    return orjson.dumps(json_format.MessageToDict(response))


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def status_body(code: int, message: str, content_type: str) -> bytes:
    """A ``google.rpc.Status`` (code, message), as the OTLP/HTTP spec asks of 4xx/5xx bodies.

    Encoded by hand (field 1 varint, field 2 string) because googleapis-common-protos
    is not a dependency; JSON requests get its JSON form.
    """
    if content_type != PROTOBUF:
        return orjson.dumps({"code": code, "message": message})
    text = message.encode()
    return b"\x08" + _varint(code) + b"\x12" + _varint(len(text)) + text
