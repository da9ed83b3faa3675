"""The OpenAPI 3.1 document of the query API (served at ``/v1/openapi.json``)."""

from __future__ import annotations

from typing import Any


def _param(
    name: str, description: str, *, required: bool = False, schema: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "description": description,
        "schema": schema or {"type": "string"},
    }


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


_TIME = {"type": "string", "description": "RFC 3339 timestamp or integer nanoseconds since the epoch"}
_PAGING = [
    _param(
        "limit", "Rows per page (default 100).", schema={"type": "integer", "minimum": 1, "maximum": 1000}
    ),
    _param("cursor", "Opaque cursor from the previous page's next_cursor."),
    _param("offset", "Rows to skip (instead of a cursor).", schema={"type": "integer", "minimum": 0}),
]
_ERRORS = {
    str(code): {
        "description": text,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    for code, text in (
        (400, "Bad parameter or cursor"),
        (401, "Missing, unknown or revoked API key"),
        (403, "The key belongs to another tenant"),
        (503, "The tenant's store is held by a worker (betrace serve) or the ledger is unavailable"),
    )
}


def _ok(schema: str) -> dict[str, Any]:
    return {
        "200": {
            "description": "OK",
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
        }
    }


OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "BeTrace query API",
        "version": "1",
        "description": "Traces and signals of the tenant the API key belongs to. Lists are cursor-paginated "
        "over (ingest timestamp, id): no row is missed or repeated while writes continue.",
    },
    "security": [{"bearer": []}],
    "paths": {
        "/v1/traces/{trace_id}": {
            "get": {
                "summary": "One whole trace: summary and every span",
                "parameters": [
                    {
                        "name": "trace_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
                    }
                ],
                "responses": {
                    **_ok("Trace"),
                    **_ERRORS,
                    "404": {"description": "No such trace in this tenant"},
                },
            }
        },
        "/v1/traces": {
            "get": {
                "summary": "Trace summaries by start time range, service and span attribute",
                "parameters": [
                    _param("start", "Traces starting at or after this time.", schema=_TIME),
                    _param("end", "Traces starting before this time.", schema=_TIME),
                    _param("service", "Only traces with a span of this service."),
                    _param("attribute", "Only traces with a span whose attribute equals a value: key=value."),
                    *_PAGING,
                ],
                "responses": {**_ok("TracePage"), **_ERRORS},
            }
        },
        "/v1/signals": {
            "get": {
                "summary": "Signals by rule, detection time range and severity",
                "parameters": [
                    _param("rule", "Rule id."),
                    _param("start", "Detected at or after this time.", schema=_TIME),
                    _param("end", "Detected before this time.", schema=_TIME),
                    _param("severity", "Comma-separated: info, low, medium, high, critical."),
                    *_PAGING,
                ],
                "responses": {**_ok("SignalPage"), **_ERRORS},
            }
        },
        "/v1/signals/count": {
            "get": {
                "summary": "Signals per rule version, from the ledger's account balances",
                "parameters": [_param("rule", "Rule id.", required=True)],
                "responses": {**_ok("SignalCount"), **_ERRORS, "404": {"description": "No ledger attached"}},
            }
        },
        "/v1/audit/events": {
            "get": {
                "summary": "The tenant's audit events, newest last, cursor-paginated over (recorded_at, id)",
                "parameters": [
                    _param("type", "Comma-separated event types, e.g. signal.emitted,rule.changed."),
                    _param("actor", "Who caused the event."),
                    _param("subject", "What the event is about."),
                    _param("outcome", "ok, failed, open, closed, ..."),
                    _param("since", "Recorded at or after this time.", schema=_TIME),
                    _param("until", "Recorded before this time.", schema=_TIME),
                    *_PAGING[:2],
                ],
                "responses": {**_ok("AuditPage"), **_ERRORS},
            }
        },
        "/v1/audit/events/{event_id}": {
            "get": {
                "summary": "One audit event",
                "parameters": [_path("event_id")],
                "responses": {**_ok("AuditEvent"), **_ERRORS, "404": {"description": "No such event"}},
            }
        },
        "/v1/audit/events/{event_id}/children": {
            "get": {
                "summary": "The direct children of an event (an index lookup, never a scan)",
                "parameters": [_path("event_id"), *_PAGING[:2]],
                "responses": {**_ok("AuditPage"), **_ERRORS, "404": {"description": "No such event"}},
            }
        },
        "/v1/audit/events/{event_id}/chain": {
            "get": {
                "summary": "An event with its ancestors and descendants (bounded depth)",
                "parameters": [
                    _path("event_id"),
                    _param("max_depth", "Levels to walk each way.", schema={"type": "integer", "minimum": 1}),
                ],
                "responses": {**_ok("AuditChain"), **_ERRORS, "404": {"description": "No such event"}},
            }
        },
        "/v1/runs": {
            "get": {
                "summary": "Ingestion runs (worker sessions, produce and import), newest first",
                "parameters": [
                    _param("kind", "worker, produce or import."),
                    _param("state", "running, finished, failed or stale."),
                    *_PAGING[:2],
                ],
                "responses": {**_ok("Page"), **_ERRORS},
            }
        },
        "/v1/runs/{run_id}": {
            "get": {
                "summary": "One ingestion run with its counters and failures",
                "parameters": [_path("run_id")],
                "responses": {**_ok("Object"), **_ERRORS, "404": {"description": "No such run"}},
            }
        },
        "/v1/anomalies": {
            "get": {
                "summary": "Trace integrity anomalies of the tenant (orphans, missing roots, skew, ...)",
                "parameters": [
                    _param("kind", "Anomaly kind, e.g. orphan_span or missing_root."),
                    _param("state", "open or resolved."),
                    _param("trace_id", "Only this trace (32 hex digits)."),
                    *_PAGING,
                ],
                "responses": {**_ok("Page"), **_ERRORS},
            }
        },
        "/v1/openapi.json": {
            "get": {"summary": "This document", "security": [], "responses": {"200": {"description": "OK"}}}
        },
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "btk_… API key"}},
        "schemas": {
            "Error": {
                "type": "object",
                "properties": {
                    "error": {
                        "type": "object",
                        "properties": {"status": {"type": "integer"}, "reason": {"type": "string"}},
                    }
                },
            },
            "Span": {
                "type": "object",
                "properties": {
                    "trace_id": {"type": "string"},
                    "span_id": {"type": "string"},
                    "parent_span_id": {"type": ["string", "null"]},
                    "name": {"type": "string"},
                    "service": {"type": ["string", "null"]},
                    "kind": {"type": "integer"},
                    "status_code": {"type": "integer"},
                    "start_ns": {"type": "integer"},
                    "end_ns": {"type": "integer"},
                    "attributes": {"type": "object"},
                    "resource_attributes": {"type": "object"},
                },
            },
            "TraceSummary": {
                "type": "object",
                "properties": {
                    "trace_id": {"type": "string"},
                    "start_ns": {"type": "integer"},
                    "end_ns": {"type": "integer"},
                    "span_count": {"type": "integer"},
                    "error_count": {"type": "integer"},
                    "root_name": {"type": ["string", "null"]},
                    "root_service": {"type": ["string", "null"]},
                    "services": {"type": "array", "items": {"type": "string"}},
                    "ingested_ns": {"type": "integer"},
                },
            },
            "Trace": {
                "allOf": [
                    {"$ref": "#/components/schemas/TraceSummary"},
                    {
                        "type": "object",
                        "properties": {
                            "spans": {"type": "array", "items": {"$ref": "#/components/schemas/Span"}}
                        },
                    },
                ]
            },
            "Signal": {
                "type": "object",
                "description": "As in docs/signals.md, plus emitted and recorded_ns.",
                "properties": {
                    "signal_id": {"type": "string"},
                    "rule_id": {"type": "string"},
                    "rule_version": {"type": "integer"},
                    "rule_name": {"type": "string"},
                    "trace_id": {"type": "string"},
                    "span_ids": {"type": "array", "items": {"type": "string"}},
                    "severity": {"type": "string"},
                    "message": {"type": "string"},
                    "detected_at": {"type": "string"},
                    "source_produced_ms": {"type": "integer"},
                    "emitted": {"type": "boolean"},
                    "recorded_ns": {"type": "integer"},
                },
            },
            "TracePage": {
                "type": "object",
                "properties": {
                    "items": {"type": "array", "items": {"$ref": "#/components/schemas/TraceSummary"}},
                    "next_cursor": {"type": ["string", "null"]},
                    "limit": {"type": "integer"},
                },
            },
            "SignalPage": {
                "type": "object",
                "properties": {
                    "items": {"type": "array", "items": {"$ref": "#/components/schemas/Signal"}},
                    "next_cursor": {"type": ["string", "null"]},
                    "limit": {"type": "integer"},
                },
            },
            "Object": {"type": "object"},
            "Page": {
                "type": "object",
                "properties": {
                    "items": {"type": "array", "items": {"type": "object"}},
                    "next_cursor": {"type": ["string", "null"]},
                    "limit": {"type": "integer"},
                },
            },
            "AuditEvent": {
                "type": "object",
                "description": "As in docs/audit.md.",
                "properties": {
                    "event_id": {"type": "string"},
                    "event_date": {"type": "string"},
                    "parent_event_id": {"type": ["string", "null"]},
                    "parent_event_date": {"type": ["string", "null"]},
                    "event_type": {"type": "string"},
                    "actor": {"type": "string"},
                    "tenant": {"type": ["string", "null"]},
                    "subject": {"type": "string"},
                    "outcome": {"type": "string"},
                    "payload": {"type": "object"},
                    "recorded_at": {"type": "integer"},
                },
            },
            "AuditPage": {
                "type": "object",
                "properties": {
                    "items": {"type": "array", "items": {"$ref": "#/components/schemas/AuditEvent"}},
                    "next_cursor": {"type": ["string", "null"]},
                    "resume_cursor": {"type": ["string", "null"]},
                    "limit": {"type": "integer"},
                },
            },
            "AuditChain": {
                "type": "object",
                "properties": {
                    "event": {"$ref": "#/components/schemas/AuditEvent"},
                    "ancestors": {"type": "array", "items": {"$ref": "#/components/schemas/AuditEvent"}},
                    "descendants": {"type": "array", "items": {"$ref": "#/components/schemas/AuditEvent"}},
                    "hidden": {"type": "integer"},
                    "truncated": {"type": "boolean"},
                    "max_depth": {"type": "integer"},
                },
            },
            "SignalCount": {
                "type": "object",
                "properties": {
                    "rule": {"type": "string"},
                    "total": {"type": "integer"},
                    "versions": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {"version": {"type": "integer"}, "signals": {"type": "integer"}},
                        },
                    },
                },
            },
        },
    },
}
