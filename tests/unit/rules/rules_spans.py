"""Build SPAN_SCHEMA tables from a compact span notation (used by the rule tests).

A span is a dict: ``name`` (required), ``id``, ``parent`` (id of the parent
span), ``start`` and ``dur`` in milliseconds (or ``start_ns``/``dur_ns``),
``attrs`` (span attributes), ``resource`` (resource attributes), ``service``,
``status`` (unset|ok|error) and ``kind`` (unspecified|internal|server|client|
producer|consumer). Missing ids are generated; a missing ``start`` places the
span 1 ms after the previous one.
"""

from __future__ import annotations

from typing import Any

import orjson
import pyarrow as pa

from betrace.streams.schemas import SPAN_SCHEMA

KINDS = ("unspecified", "internal", "server", "client", "producer", "consumer")
STATUSES = ("unset", "ok", "error")
BASE_NS = 1_700_000_000_000_000_000


def make_table(traces: dict[str, list[dict[str, Any]]], tenant: str = "t1") -> pa.Table:
    rows: dict[str, list[Any]] = {name: [] for name in SPAN_SCHEMA.names}
    for trace_id, spans in traces.items():
        clock = 0.0
        for index, span in enumerate(spans):
            start_ns = span.get("start_ns")
            if start_ns is None:
                start_ms = float(span.get("start", clock))
                start_ns = BASE_NS + round(start_ms * 1_000_000)
            dur_ns = span.get("dur_ns")
            if dur_ns is None:
                dur_ns = round(float(span.get("dur", 1)) * 1_000_000)
            clock = (start_ns - BASE_NS) / 1_000_000 + 1
            resource = dict(span.get("resource", {}))
            service = span.get("service", resource.get("service.name", "svc"))
            resource.setdefault("service.name", service)
            rows["tenant"].append(tenant)
            rows["trace_id"].append(trace_id)
            rows["span_id"].append(str(span.get("id", f"s{index}")))
            parent = span.get("parent")
            rows["parent_span_id"].append(None if parent is None else str(parent))
            rows["name"].append(span["name"])
            rows["service"].append(service)
            rows["kind"].append(KINDS.index(span.get("kind", "internal")))
            rows["status_code"].append(STATUSES.index(span.get("status", "unset")))
            rows["start_ns"].append(start_ns)
            rows["end_ns"].append(start_ns + dur_ns)
            rows["attributes"].append(orjson.dumps(span.get("attrs", {})).decode())
            rows["resource_attributes"].append(orjson.dumps(resource).decode())
            rows["produced_ms"].append(0)
    return pa.table(rows, schema=SPAN_SCHEMA)
