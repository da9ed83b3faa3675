"""Synthetic hot data written straight into a tenant file with SQL (tests, benchmark).

Real pipelines fill tenant files through Kafka; archival only needs the rows,
and generating ten million spans in SQL takes seconds instead of minutes.
Trace and span ids are derived from a seed with ``md5``, so a given call
always produces the same rows.
"""

from __future__ import annotations

import datetime as dt

import duckdb

from betrace.archive.layout import day_start_ns
from betrace.sinks.duckdb_store import SCHEMA_SQL, SUMMARY_APPEND_SQL
from betrace.sinks.store_schema import SPAN_KEY_SQL

_GENERATED_SQL = """
SELECT $tenant,
       md5($seed || ':' || (i // $per_trace)::VARCHAR) AS trace_id,
       substr(md5($seed || ':s:' || i::VARCHAR), 1, 16) AS span_id,
       CASE WHEN i % $per_trace = 0 THEN NULL
            ELSE substr(md5($seed || ':s:' || ((i // $per_trace) * $per_trace)::VARCHAR), 1, 16) END,
       ['checkout', 'db.query', 'payment.charge_card', 'audit.log', 'pii.access'][1 + (i % 5)],
       ['api', 'db', 'payments', 'audit'][1 + ((i // $per_trace) % 4)],
       (i % 3)::TINYINT,
       (CASE WHEN i % 97 = 0 THEN 2 ELSE 0 END)::TINYINT,
       $start + (i // $per_trace) * $trace_gap + (i % $per_trace) * 1000,
       $start + (i // $per_trace) * $trace_gap + (i % $per_trace) * 1000 + 5000,
       '{"http.status_code": ' || (200 + (i % 4) * 100)::VARCHAR
           || ', "user.id": "u' || (i % 1000)::VARCHAR || '"}',
       '{"service.name": "svc"}',
       ($start // 1000000)
FROM range($n) t(i)
"""
SPANS_SQL = f"INSERT OR IGNORE INTO spans SELECT *, {SPAN_KEY_SQL} FROM ({_GENERATED_SQL}) AS g(tenant, trace_id, span_id)"  # noqa: E501, S608 - fixed SQL

SIGNALS_SQL = """
INSERT OR IGNORE INTO signals (signal_id, tenant, rule_id, rule_version, rule_name, trace_id, span_ids,
    severity, message, detected_at, source_produced_ms, emitted, recorded_ns)
SELECT md5($seed || ':sig:' || i::VARCHAR), $tenant, 'pii-audit', 1, 'Every PII access is audited',
       md5($seed || ':' || i::VARCHAR), [substr(md5($seed || ':s:' || (i * $per_trace)::VARCHAR), 1, 16)],
       ['info', 'low', 'medium', 'high', 'critical'][1 + (i % 5)], 'pii.access without audit.log',
       make_timestamptz(($start + i * $trace_gap + 10000) // 1000), $start // 1000000, TRUE,
       $start + i
FROM range($n) t(i)
"""


def fill_day(
    con: duckdb.DuckDBPyConnection,
    tenant: str,
    day: dt.date,
    *,
    spans: int,
    spans_per_trace: int = 10,
    signals: int = 0,
    seed: str | None = None,
) -> None:
    """Add ``spans`` spans (traces of ``spans_per_trace``) and ``signals`` signals on ``day``."""
    con.execute(SCHEMA_SQL)
    seed = seed or f"{tenant}:{day.isoformat()}"
    traces = max(1, spans // spans_per_trace)
    gap = max(1, (86_000 * 10**9) // traces)  # every trace starts and ends within the day
    params = {
        "tenant": tenant,
        "seed": seed,
        "per_trace": spans_per_trace,
        "start": day_start_ns(day),
        "trace_gap": gap,
        "n": spans,
    }
    bounds = {"a": day_start_ns(day), "b": day_start_ns(day + dt.timedelta(days=1))}
    con.execute("BEGIN TRANSACTION")
    con.execute(
        "CREATE OR REPLACE TEMP TABLE _before AS "
        "SELECT trace_id, span_id FROM spans WHERE start_ns >= $a AND start_ns < $b",
        bounds,
    )
    con.execute(SPANS_SQL, params)
    # The summary parts of exactly the new rows, as the span sink writes them (a view, not a copy).
    where = f"start_ns >= {bounds['a']} AND start_ns < {bounds['b']}"  # views take no parameters
    con.execute(
        "CREATE OR REPLACE TEMP VIEW _new AS "  # noqa: S608 - integers only
        "SELECT trace_id, parent_span_id, name, service, status_code, start_ns, end_ns FROM spans s "
        f"WHERE {where} AND NOT EXISTS "
        "(SELECT 1 FROM _before b WHERE b.trace_id = s.trace_id AND b.span_id = s.span_id)"
    )
    con.execute(SUMMARY_APPEND_SQL, [tenant, day_start_ns(day)])
    con.execute("DROP VIEW _new")
    con.execute("DROP TABLE _before")
    if signals:
        con.execute(SIGNALS_SQL, {**params, "n": min(signals, traces)})
    con.execute("COMMIT")
