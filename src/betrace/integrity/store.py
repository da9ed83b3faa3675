"""The ``anomalies`` table of a tenant's DuckDB file: record, resolve, list.

One row per anomaly id (:func:`~betrace.integrity.checks.anomaly_id`:
tenant, kind, trace, span), so a re-check updates ``last_seen_at`` instead of
adding a row. A check over stored spans resolves the open anomalies of the
traces it covered that it no longer finds (the missing parent arrived, say);
finding one again re-opens it. ``recorded_ns`` is set once, strictly
increasing per file: the key of the keyset cursor, like ``signals``.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import duckdb
import orjson
import pyarrow as pa

from betrace.api.queries import Page, Result, _paged
from betrace.integrity.checks import STORED_KINDS, check_sql
from betrace.sinks.store_schema import SPAN_COLUMNS_SQL

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS anomalies (
    anomaly_id VARCHAR PRIMARY KEY,
    tenant VARCHAR NOT NULL,
    kind VARCHAR NOT NULL,
    trace_id VARCHAR NOT NULL,
    span_id VARCHAR NOT NULL,
    state VARCHAR NOT NULL,
    detected_at TIMESTAMPTZ NOT NULL,
    last_seen_at TIMESTAMPTZ NOT NULL,
    resolved_at TIMESTAMPTZ,
    source VARCHAR NOT NULL,
    details JSON NOT NULL,
    recorded_ns BIGINT NOT NULL
);
"""

_ID_SQL = "left(sha256(concat_ws(chr(31), ?, kind, trace_id, span_id)), 32)"

#: Found anomalies as ``_found`` (kind, trace_id, span_id, details) → ``_ids``, one row per id.
IDS_SQL = f"""
CREATE OR REPLACE TEMP TABLE _ids AS
SELECT {_ID_SQL} AS anomaly_id, kind, trace_id, span_id, any_value(details) AS details
FROM _found GROUP BY ALL
"""  # noqa: S608 - a fixed expression
OPENED_SQL = """
SELECT i.kind, count(*) FROM _ids i LEFT JOIN anomalies a USING (anomaly_id)
WHERE a.anomaly_id IS NULL OR a.state = 'resolved' GROUP BY i.kind
"""
UPSERT_SQL = """
INSERT INTO anomalies
SELECT anomaly_id, ?, kind, trace_id, span_id, 'open', ?, ?, NULL, ?, details,
       greatest(?, (SELECT coalesce(max(recorded_ns), 0) FROM anomalies))
           + row_number() OVER (ORDER BY anomaly_id)
FROM _ids
ON CONFLICT (anomaly_id) DO UPDATE SET
    state = 'open', last_seen_at = excluded.last_seen_at, resolved_at = NULL,
    source = excluded.source, details = excluded.details
"""
RESOLVE_SQL = """
UPDATE anomalies SET state = 'resolved', resolved_at = ?
WHERE state = 'open' AND list_contains(?, kind)
  AND trace_id IN (SELECT trace_id FROM _scope)
  AND anomaly_id NOT IN (SELECT anomaly_id FROM _ids)
RETURNING kind
"""

ANOMALY_COLUMNS = (
    "anomaly_id",
    "kind",
    "trace_id",
    "span_id",
    "state",
    "detected_at",
    "last_seen_at",
    "resolved_at",
    "source",
    "details",
    "recorded_ns",
)
STATES = ("open", "resolved")


@dataclass(slots=True)
class CheckOutcome:
    """What one check found and changed in one tenant's file."""

    tenant: str
    traces: int = 0
    found: Counter[str] = field(default_factory=Counter)
    opened: Counter[str] = field(default_factory=Counter)
    resolved: Counter[str] = field(default_factory=Counter)


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(SCHEMA_SQL)


def has_table(con: duckdb.DuckDBPyConnection) -> bool:
    rows = con.execute(
        "SELECT count(*) FROM duckdb_tables()"
        " WHERE table_name = 'anomalies' AND database_name = current_database()"
    ).fetchall()
    return rows == [(1,)]


def _record(
    con: duckdb.DuckDBPyConnection, tenant: str, found: pa.Table, source: str, out: CheckOutcome
) -> None:
    """Upsert ``found`` as open anomalies (``_ids`` stays for a resolve step)."""
    now = dt.datetime.now(dt.UTC)
    con.register("_found", found)
    try:
        con.execute(IDS_SQL, [tenant])
    finally:
        con.unregister("_found")
    for kind, n in con.execute("SELECT kind, count(*) FROM _ids GROUP BY kind").fetchall():
        out.found[str(kind)] += int(n)
    for kind, n in con.execute(OPENED_SQL).fetchall():
        out.opened[str(kind)] += int(n)
    con.execute(UPSERT_SQL, [tenant, now, now, source, time.time_ns()])


def find_closed(con: duckdb.DuckDBPyConnection, traces: pa.Table, skew_ns: int) -> pa.Table:
    """What is wrong with a batch of closed (whole) traces of any tenants; reads nothing else.

    Columns: ``kind``, ``tenant``, ``trace_id``, ``span_id``, ``details``. Any
    connection will do; the worker uses one in-memory connection for all tenants,
    as one query per tenant file cost ~18 ms each even for a few hundred spans.
    """
    con.register("_closed", traces)
    try:
        return con.sql(check_sql("_closed", "_closed"), params=[skew_ns, skew_ns]).to_arrow_table()
    finally:
        con.unregister("_closed")


def record_closed(con: duckdb.DuckDBPyConnection, tenant: str, found: pa.Table) -> CheckOutcome:
    """Record ``found`` (:func:`find_closed` rows of ``tenant``) in the tenant's file."""
    out = CheckOutcome(tenant)
    if found.num_rows == 0:
        return out
    ensure_schema(con)
    con.execute("BEGIN TRANSACTION")
    try:
        _record(con, tenant, found, "close", out)
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return out


def check_closed(con: duckdb.DuckDBPyConnection, tenant: str, traces: pa.Table, skew_ns: int) -> CheckOutcome:
    """Check a batch of closed traces (whole traces) of ``tenant`` and record what is wrong with them."""
    return record_closed(con, tenant, find_closed(con, traces, skew_ns))


def check_stored(
    con: duckdb.DuckDBPyConnection, tenant: str, *, since_ns: int | None, skew_ns: int
) -> CheckOutcome:
    """Re-check stored traces ending at or after ``since_ns`` (all when None); resolve what is fixed."""
    out = CheckOutcome(tenant)
    ensure_schema(con)
    con.execute("BEGIN TRANSACTION")
    try:
        if since_ns is None:
            con.execute("CREATE OR REPLACE TEMP TABLE _scope AS SELECT DISTINCT trace_id FROM spans")
        else:
            con.execute(
                "CREATE OR REPLACE TEMP TABLE _scope AS "
                "SELECT DISTINCT trace_id FROM trace_summaries WHERE end_ns >= ?",
                [since_ns],
            )
        out.traces = int(con.execute("SELECT count(*) FROM _scope").fetchall()[0][0])
        src = f"(SELECT {SPAN_COLUMNS_SQL} FROM spans WHERE trace_id IN (SELECT trace_id FROM _scope))"  # noqa: S608
        found = con.sql(check_sql(src, "spans"), params=[skew_ns, skew_ns]).to_arrow_table()
        _record(con, tenant, found, "check", out)
        resolved = con.execute(RESOLVE_SQL, [dt.datetime.now(dt.UTC), list(STORED_KINDS)]).fetchall()
        for (kind,) in resolved:
            out.resolved[str(kind)] += 1
        con.execute("DROP TABLE _scope")
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return out


def list_anomalies(
    con: duckdb.DuckDBPyConnection,
    *,
    kind: str | None = None,
    state: str | None = None,
    trace_id: str | None = None,
    page: Page | None = None,
) -> Result:
    """Anomalies in the order they were first recorded (keyset on ``(recorded_ns, anomaly_id)``)."""
    page = page or Page()
    if not has_table(con):
        return Result([], None)
    where: list[str] = ["TRUE"]
    params: list[Any] = []
    for column, value in (("kind", kind), ("state", state), ("trace_id", trace_id)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if page.after is not None:
        where.append("(recorded_ns > ? OR (recorded_ns = ? AND anomaly_id > ?))")
        params.extend([page.after[0], page.after[0], page.after[1]])
    stamp = "strftime({c} AT TIME ZONE 'UTC', '%Y-%m-%dT%H:%M:%S.%gZ')"
    cols = ", ".join(
        stamp.format(c=c) if c in ("detected_at", "last_seen_at", "resolved_at") else c
        for c in ANOMALY_COLUMNS
    )
    sql = (
        f"SELECT {cols} FROM anomalies WHERE {' AND '.join(where)} "  # noqa: S608 - fixed parts
        "ORDER BY recorded_ns, anomaly_id"
    )
    result = _paged(con, sql, params, ANOMALY_COLUMNS, page=page, key=("recorded_ns", "anomaly_id"))
    for item in result.items:
        if isinstance(item.get("details"), str):
            item["details"] = orjson.loads(item["details"])
    return result


def count_by_kind(con: duckdb.DuckDBPyConnection) -> dict[tuple[str, str], int]:
    """``(kind, state) -> rows``."""
    if not has_table(con):
        return {}
    rows = con.execute("SELECT kind, state, count(*) FROM anomalies GROUP BY ALL").fetchall()
    return {(str(k), str(s)): int(n) for k, s, n in rows}
