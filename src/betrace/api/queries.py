"""Hot-store queries of one tenant's DuckDB file: traces, spans by attribute, signals.

Every function takes a connection to *one* tenant's file: tenant isolation is
physical (which file is opened), never a ``WHERE tenant = ...`` that a bug
could drop. Lists are keyset-paginated on ``(ingested_ns, trace_id)`` /
``(recorded_ns, signal_id)`` (see :mod:`betrace.api.cursor`); ``offset``
is still accepted for clients that page by position.

Hot and cold: every function takes ``tables``, a ``WITH`` prefix from
:meth:`betrace.archive.coldread.ColdCatalog.attach` that puts the tenant's
archived Parquet files behind the same table names (``spans``, ``traces``,
``trace_summaries``, ``signals``), so the same SQL answers over both tiers and
a result does not change when its day is archived.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import duckdb
import orjson

from betrace.archive.coldread import HOT, Tables

TRACE_ID_RE = re.compile(r"^[0-9a-f]{32}$")
ATTRIBUTE_KEY_RE = re.compile(r"^[A-Za-z0-9_.\-/:]{1,128}$")
SEVERITIES = ("info", "low", "medium", "high", "critical")

SPAN_COLUMNS = (
    "trace_id",
    "span_id",
    "parent_span_id",
    "name",
    "service",
    "kind",
    "status_code",
    "start_ns",
    "end_ns",
    "attributes",
    "resource_attributes",
)
TRACE_COLUMNS = (
    "trace_id",
    "start_ns",
    "end_ns",
    "span_count",
    "error_count",
    "root_name",
    "root_service",
    "services",
    "ingested_ns",
)
SIGNAL_COLUMNS = (
    "signal_id",
    "rule_id",
    "rule_version",
    "rule_name",
    "trace_id",
    "span_ids",
    "severity",
    "message",
    "detected_at",
    "source_produced_ms",
    "emitted",
    "recorded_ns",
)
DETECTED_AT_SQL = "strftime(detected_at AT TIME ZONE 'UTC', '%Y-%m-%dT%H:%M:%S.%gZ')"


TRACE_BY_ID_SQL = f"SELECT {', '.join(TRACE_COLUMNS)} FROM traces WHERE trace_id = ?"  # noqa: S608
SPANS_BY_TRACE_SQL = (
    f"SELECT {', '.join(SPAN_COLUMNS)} FROM spans WHERE trace_id = ? ORDER BY start_ns, span_id"  # noqa: S608
)


@dataclass(frozen=True, slots=True)
class Page:
    limit: int = 100
    offset: int = 0
    after: tuple[int, str] | None = None


@dataclass(frozen=True, slots=True)
class Result:
    items: list[dict[str, Any]]
    #: Key of the last item when more rows may follow, else None.
    next_key: tuple[int, str] | None


def _rows(
    con: duckdb.DuckDBPyConnection, sql: str, params: list[Any], columns: tuple[str, ...]
) -> list[dict[str, Any]]:
    return [dict(zip(columns, row, strict=True)) for row in con.execute(sql, params).fetchall()]


def _paged(
    con: duckdb.DuckDBPyConnection,
    sql: str,
    params: list[Any],
    columns: tuple[str, ...],
    *,
    page: Page,
    key: tuple[str, str],
) -> Result:
    rows = _rows(con, f"{sql} LIMIT ? OFFSET ?", [*params, page.limit + 1, page.offset], columns)
    more = len(rows) > page.limit
    rows = rows[: page.limit]
    next_key = (int(rows[-1][key[0]]), str(rows[-1][key[1]])) if more and rows else None
    return Result(rows, next_key)


def _span(row: dict[str, Any]) -> dict[str, Any]:
    row["attributes"] = orjson.loads(row["attributes"])
    row["resource_attributes"] = orjson.loads(row["resource_attributes"])
    return row


def get_trace(
    con: duckdb.DuckDBPyConnection, trace_id: str, *, tables: Tables = HOT
) -> dict[str, Any] | None:
    """The whole trace (summary and every span, by start time), or None."""
    summary = _rows(con, tables.prefix + TRACE_BY_ID_SQL, [trace_id], TRACE_COLUMNS)
    if not summary:
        return None
    spans = _rows(con, tables.prefix + SPANS_BY_TRACE_SQL, [trace_id], SPAN_COLUMNS)
    return {**summary[0], "spans": [_span(s) for s in spans]}


def attribute_path(key: str) -> str:
    return '$."' + key + '"'


def list_traces(
    con: duckdb.DuckDBPyConnection,
    *,
    start_ns: int | None = None,
    end_ns: int | None = None,
    service: str | None = None,
    attribute: tuple[str, str] | None = None,
    page: Page = Page(),
    tables: Tables = HOT,
) -> Result:
    """Trace summaries whose start is in [start_ns, end_ns), by ingest order."""
    part_where, where = ["TRUE"], ["TRUE"]
    params_parts: list[Any] = []
    params: list[Any] = []
    if start_ns is not None:
        part_where.append("start_ns >= ?")
        where.append("start_ns >= ?")
        params_parts.append(start_ns)
        params.append(start_ns)
    if end_ns is not None:
        part_where.append("start_ns < ?")
        where.append("start_ns < ?")
        params_parts.append(end_ns)
        params.append(end_ns)
    if service is not None:
        part_where.append("list_contains(services, ?)")
        where.append("list_contains(services, ?)")
        params_parts.append(service)
        params.append(service)
    if attribute is not None:
        where.append("trace_id IN (SELECT trace_id FROM spans WHERE json_extract_string(attributes, ?) = ?)")
        params.extend([attribute_path(attribute[0]), attribute[1]])
    if page.after is not None:
        where.append("(ingested_ns > ? OR (ingested_ns = ? AND trace_id > ?))")
        params.extend([page.after[0], page.after[0], page.after[1]])
    body = (
        f"SELECT {', '.join(TRACE_COLUMNS)} FROM traces "  # noqa: S608 - fixed clauses, bound values
        f"WHERE trace_id IN (SELECT trace_id FROM trace_summaries WHERE {' AND '.join(part_where)}) "
        f"AND {' AND '.join(where)} ORDER BY ingested_ns, trace_id"
    )
    sql = tables.prefix + body
    return _paged(
        con, sql, [*params_parts, *params], TRACE_COLUMNS, page=page, key=("ingested_ns", "trace_id")
    )


def spans_with_attribute(
    con: duckdb.DuckDBPyConnection,
    key: str,
    value: str,
    *,
    start_ns: int | None = None,
    end_ns: int | None = None,
    limit: int = 100,
    tables: Tables = HOT,
) -> list[dict[str, Any]]:
    """Spans whose attribute ``key`` equals ``value`` (as a string), by start time."""
    where = ["json_extract_string(attributes, ?) = ?"]
    params: list[Any] = [attribute_path(key), value]
    if start_ns is not None:
        where.append("start_ns >= ?")
        params.append(start_ns)
    if end_ns is not None:
        where.append("start_ns < ?")
        params.append(end_ns)
    body = (
        f"SELECT {', '.join(SPAN_COLUMNS)} FROM spans "  # noqa: S608 - fixed clauses, bound values
        f"WHERE {' AND '.join(where)} ORDER BY start_ns, span_id LIMIT ?"
    )
    sql = tables.prefix + body
    return [_span(r) for r in _rows(con, sql, [*params, limit], SPAN_COLUMNS)]


def list_signals(
    con: duckdb.DuckDBPyConnection,
    *,
    rule: str | None = None,
    start_ns: int | None = None,
    end_ns: int | None = None,
    severities: tuple[str, ...] = (),
    page: Page = Page(),
    tables: Tables = HOT,
) -> Result:
    """Signals detected in [start_ns, end_ns), by the order they were recorded."""
    where: list[str] = ["TRUE"]
    params: list[Any] = []
    if rule is not None:
        where.append("rule_id = ?")
        params.append(rule)
    if start_ns is not None:
        where.append("epoch_ns(detected_at) >= ?")
        params.append(start_ns)
    if end_ns is not None:
        where.append("epoch_ns(detected_at) < ?")
        params.append(end_ns)
    if severities:
        where.append("list_contains(?, severity)")
        params.append(list(severities))
    if page.after is not None:
        where.append("(recorded_ns > ? OR (recorded_ns = ? AND signal_id > ?))")
        params.extend([page.after[0], page.after[0], page.after[1]])
    cols = ", ".join(
        c if c != "detected_at" else "strftime(detected_at AT TIME ZONE 'UTC', '%Y-%m-%dT%H:%M:%S.%gZ')"
        for c in SIGNAL_COLUMNS
    )
    body = f"SELECT {cols} FROM signals WHERE {' AND '.join(where)} ORDER BY recorded_ns, signal_id"  # noqa: S608
    sql = tables.prefix + body
    return _paged(con, sql, params, SIGNAL_COLUMNS, page=page, key=("recorded_ns", "signal_id"))
