"""Decode OTLP ``ExportTraceServiceRequest`` records into columnar span batches.

This is the only place with per-span Python work. Both encodings of the
OpenTelemetry Collector's Kafka exporter are supported: ``otlp_proto`` (its
default) and ``otlp_json`` (OTLP/JSON: hex ids, int64 as strings).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import pyarrow as pa
from google.protobuf.message import DecodeError as ProtobufDecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from betrace.errors import DecodeError, KeyDecodeError, ValueDecodeError
from betrace.streams.schemas import SPAN_SCHEMA

_TENANT_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX16 = re.compile(r"[0-9a-f]{16}")
# Arrow int64 columns: a fixed64 timestamp past this would fail the whole batch.
_MAX_NS = 2**63 - 1
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_JSON_KIND = {
    "SPAN_KIND_UNSPECIFIED": 0,
    "SPAN_KIND_INTERNAL": 1,
    "SPAN_KIND_SERVER": 2,
    "SPAN_KIND_CLIENT": 3,
    "SPAN_KIND_PRODUCER": 4,
    "SPAN_KIND_CONSUMER": 5,
}
_JSON_STATUS = {"STATUS_CODE_UNSET": 0, "STATUS_CODE_OK": 1, "STATUS_CODE_ERROR": 2}


@dataclass(frozen=True, slots=True)
class Record:
    """The parts of a Kafka record that decoding needs."""

    value: bytes | None
    key: bytes | None = None
    headers: Sequence[tuple[str, bytes]] = ()
    timestamp_ms: int = 0
    topic: str = ""
    partition: int = -1
    offset: int = -1


@dataclass(slots=True)
class DeadLetter:
    """A record, byte for byte, with the reason it could not be fully used."""

    record: Record
    reason: str
    detail: str


@dataclass(slots=True)
class DecodedBatch:
    """The spans of many records as one table, plus what went to dead letters."""

    spans: pa.Table
    dead_letters: list[DeadLetter] = field(default_factory=list)
    records: int = 0


class _Columns:
    """Column builders; appending to Python lists is the cheapest path to Arrow."""

    __slots__ = (
        "attributes",
        "end_ns",
        "kind",
        "name",
        "parent_span_id",
        "produced_ms",
        "resource_attributes",
        "service",
        "span_id",
        "start_ns",
        "status_code",
        "tenant",
        "trace_id",
    )

    def __init__(self) -> None:
        self.tenant: list[str] = []
        self.trace_id: list[str] = []
        self.span_id: list[str] = []
        self.parent_span_id: list[str | None] = []
        self.name: list[str] = []
        self.service: list[str | None] = []
        self.kind: list[int] = []
        self.status_code: list[int] = []
        self.start_ns: list[int] = []
        self.end_ns: list[int] = []
        self.attributes: list[str] = []
        self.resource_attributes: list[str] = []
        self.produced_ms: list[int] = []

    def table(self) -> pa.Table:
        arrays = [getattr(self, name) for name in SPAN_SCHEMA.names]
        return pa.Table.from_arrays(
            [pa.array(a, type=f.type) for a, f in zip(arrays, SPAN_SCHEMA, strict=True)],
            schema=SPAN_SCHEMA,
        )


def _any_value(value: Any) -> Any:
    """Convert an OTLP protobuf ``AnyValue`` to a JSON-ready Python value."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _any_value(kv.value) for kv in value.kvlist_value.values}
    if kind == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, kind)


def _json_any_value(value: dict[str, Any]) -> Any:
    """Convert an OTLP/JSON ``AnyValue`` object to a plain Python value."""
    for kind, raw in value.items():
        if kind in ("stringValue", "boolValue", "doubleValue"):
            return raw
        if kind == "intValue":
            return int(raw)
        if kind == "arrayValue":
            return [_json_any_value(v) for v in raw.get("values", ())]
        if kind == "kvlistValue":
            return {kv["key"]: _json_any_value(kv.get("value", {})) for kv in raw.get("values", ())}
        if kind == "bytesValue":
            # OTLP/JSON carries bytes as base64; store hex, as the protobuf path does.
            return base64.b64decode(raw, validate=True).hex()
    return None


def resolve_tenant(record: Record, tenant_header: str, resource_tenant: Any, default: str) -> str:
    """Tenant from the header, else the ``tenant.id`` resource attribute, else ``default``."""
    for name, raw in record.headers:
        if name == tenant_header and raw:
            tenant = raw.decode("utf-8", "replace")
            break
    else:
        tenant = resource_tenant if isinstance(resource_tenant, str) and resource_tenant else default
    if not _TENANT_RE.fullmatch(tenant):
        msg = f"tenant {tenant[:80]!r} must match {_TENANT_RE.pattern}"
        raise ValueDecodeError(msg)
    return tenant


def check_key(key: bytes | None) -> None:
    """A key, when present, must be the trace id (``partition_traces_by_id``)."""
    if not key:
        return
    if len(key) == 16:
        return
    try:
        text = key.decode("ascii")
    except UnicodeDecodeError:
        text = ""
    if not _HEX32.fullmatch(text.lower()):
        msg = f"record key is neither empty nor a trace id: {key[:40]!r}"
        raise KeyDecodeError(msg)


class OtlpDecoder:
    """Turn batches of Kafka records into one span table per batch."""

    def __init__(self, *, encoding: str, tenant_header: str, default_tenant: str) -> None:
        if encoding not in ("otlp_proto", "otlp_json"):
            msg = f"unknown encoding {encoding!r}; expected otlp_proto or otlp_json"
            raise ValueError(msg)
        self.encoding = encoding
        self.tenant_header = tenant_header
        self.default_tenant = default_tenant

    def decode(self, records: Iterable[Record]) -> DecodedBatch:
        cols = _Columns()
        dead: list[DeadLetter] = []
        count = 0
        decode_one = self._decode_proto if self.encoding == "otlp_proto" else self._decode_json
        for record in records:
            count += 1
            mark = len(cols.span_id)
            try:
                check_key(record.key)
                if not record.value:
                    msg = "empty record value"
                    raise ValueDecodeError(msg)
                invalid = decode_one(record, cols)
            except DecodeError as exc:
                _truncate(cols, mark)
                dead.append(DeadLetter(record, exc.reason, str(exc)))
                continue
            if invalid:
                dead.append(DeadLetter(record, "invalid_span", "; ".join(invalid[:10])))
        return DecodedBatch(spans=cols.table(), dead_letters=dead, records=count)

    def _decode_proto(self, record: Record, cols: _Columns) -> list[str]:  # noqa: PLR0915 - the hot loop stays inline
        request = ExportTraceServiceRequest()
        try:
            request.ParseFromString(record.value)
        except (ProtobufDecodeError, RuntimeError) as exc:
            msg = f"not an OTLP protobuf ExportTraceServiceRequest: {exc}"
            raise ValueDecodeError(msg) from None
        invalid: list[str] = []
        # Bound methods hoisted out of the per-span loop: this loop is the hot path.
        c_tenant, c_trace, c_span = cols.tenant.append, cols.trace_id.append, cols.span_id.append
        c_parent, c_name, c_service = cols.parent_span_id.append, cols.name.append, cols.service.append
        c_kind, c_status = cols.kind.append, cols.status_code.append
        c_start, c_end = cols.start_ns.append, cols.end_ns.append
        c_attrs, c_rattrs, c_ts = (
            cols.attributes.append,
            cols.resource_attributes.append,
            cols.produced_ms.append,
        )
        dumps = orjson.dumps
        ts = record.timestamp_ms
        for resource_spans in request.resource_spans:
            rattrs = {kv.key: _any_value(kv.value) for kv in resource_spans.resource.attributes}
            tenant = resolve_tenant(record, self.tenant_header, rattrs.get("tenant.id"), self.default_tenant)
            service = rattrs.get("service.name")
            service = service if isinstance(service, str) else None
            rjson = dumps(rattrs).decode()
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    trace_id = span.trace_id.hex()
                    span_id = span.span_id.hex()
                    if len(trace_id) != 32 or trace_id == _ZERO_TRACE:
                        invalid.append(f"span {span.name!r}: invalid trace_id {trace_id!r}")
                        continue
                    if len(span_id) != 16 or span_id == _ZERO_SPAN:
                        invalid.append(f"span {span.name!r}: invalid span_id {span_id!r}")
                        continue
                    start, end = span.start_time_unix_nano, span.end_time_unix_nano
                    if start > _MAX_NS or end > _MAX_NS:
                        invalid.append(f"span {span_id}: timestamp beyond int64 nanoseconds")
                        continue
                    attrs = span.attributes
                    try:
                        attr_json = (
                            dumps({kv.key: _any_value(kv.value) for kv in attrs}).decode() if attrs else "{}"
                        )
                    except (orjson.JSONEncodeError, RecursionError) as exc:
                        invalid.append(f"span {span_id}: attributes not representable: {exc}")
                        continue
                    parent = span.parent_span_id
                    kind, status = span.kind, span.status.code
                    c_tenant(tenant)
                    c_trace(trace_id)
                    c_span(span_id)
                    c_parent(
                        parent.hex() if len(parent) == 8 and any(parent) else None
                    )  # zero or odd: a root
                    c_name(span.name)
                    c_service(service)
                    # Proto3 enums are open; unknown values count as unspecified/unset.
                    c_kind(kind if 0 <= kind <= 5 else 0)
                    c_status(status if 0 <= status <= 2 else 0)
                    c_start(start)
                    c_end(end)
                    c_attrs(attr_json)
                    c_rattrs(rjson)
                    c_ts(ts)
        return invalid

    def _decode_json(self, record: Record, cols: _Columns) -> list[str]:  # noqa: PLR0915 - mirrors _decode_proto
        try:
            request = orjson.loads(record.value or b"")
        except orjson.JSONDecodeError as exc:
            msg = f"not valid JSON: {exc}"
            raise ValueDecodeError(msg) from None
        if not isinstance(request, dict) or not isinstance(request.get("resourceSpans", []), list):
            msg = "not an OTLP/JSON ExportTraceServiceRequest: expected an object with 'resourceSpans'"
            raise ValueDecodeError(msg)
        invalid: list[str] = []
        dumps = orjson.dumps
        ts = record.timestamp_ms
        try:
            for resource_spans in request.get("resourceSpans", ()):
                resource = resource_spans.get("resource") or {}
                rattrs = {
                    kv["key"]: _json_any_value(kv.get("value", {})) for kv in resource.get("attributes", ())
                }
                tenant = resolve_tenant(
                    record, self.tenant_header, rattrs.get("tenant.id"), self.default_tenant
                )
                service = rattrs.get("service.name")
                service = service if isinstance(service, str) else None
                rjson = dumps(rattrs).decode()
                for scope_spans in resource_spans.get("scopeSpans", ()):
                    for span in scope_spans.get("spans", ()):
                        name = str(span.get("name", ""))
                        trace_id = str(span.get("traceId", "")).lower()
                        span_id = str(span.get("spanId", "")).lower()
                        if not _HEX32.fullmatch(trace_id) or trace_id == _ZERO_TRACE:
                            invalid.append(f"span {name!r}: invalid traceId {trace_id[:40]!r}")
                            continue
                        if not _HEX16.fullmatch(span_id) or span_id == _ZERO_SPAN:
                            invalid.append(f"span {name!r}: invalid spanId {span_id[:40]!r}")
                            continue
                        kind = _json_enum(span.get("kind", 0), _JSON_KIND, 5)
                        status = _json_enum((span.get("status") or {}).get("code", 0), _JSON_STATUS, 2)
                        start = int(span.get("startTimeUnixNano", 0))
                        end = int(span.get("endTimeUnixNano", 0))
                        if not (0 <= start <= _MAX_NS and 0 <= end <= _MAX_NS):
                            invalid.append(f"span {span_id}: timestamp outside int64 nanoseconds")
                            continue
                        attrs = span.get("attributes")
                        attr_json = (
                            dumps({kv["key"]: _json_any_value(kv.get("value", {})) for kv in attrs}).decode()
                            if attrs
                            else "{}"
                        )
                        # Append only once every field converted, so columns stay aligned.
                        cols.tenant.append(tenant)
                        cols.trace_id.append(trace_id)
                        cols.span_id.append(span_id)
                        parent = str(span.get("parentSpanId") or "").lower()
                        cols.parent_span_id.append(
                            parent if _HEX16.fullmatch(parent) and parent != _ZERO_SPAN else None
                        )
                        cols.name.append(name)
                        cols.service.append(service)
                        cols.kind.append(kind)
                        cols.status_code.append(status)
                        cols.start_ns.append(start)
                        cols.end_ns.append(end)
                        cols.attributes.append(attr_json)
                        cols.resource_attributes.append(rjson)
                        cols.produced_ms.append(ts)
        except (
            AttributeError,
            KeyError,
            TypeError,
            ValueError,
            orjson.JSONEncodeError,
            RecursionError,
        ) as exc:
            msg = f"malformed OTLP/JSON request: {type(exc).__name__}: {exc}"
            raise ValueDecodeError(msg) from None
        return invalid


def _json_enum(value: Any, names: dict[str, int], highest: int) -> int:
    """An OTLP/JSON enum given by name or number; unknown values count as 0 (unset)."""
    number = names.get(value, 0) if isinstance(value, str) else int(value)
    return number if 0 <= number <= highest else 0


def _truncate(cols: _Columns, length: int) -> None:
    """Drop the spans a failed record had already appended."""
    for name in cols.__slots__:
        del getattr(cols, name)[length:]
