"""The tables of a tenant's DuckDB file, and the fixed SQL :mod:`betrace.sinks.duckdb_store` runs on them.

``spans`` is keyed by ``(trace_id, span_id)``, held as integers in the
``trace_key`` / ``span_key`` columns (the upsert's conflict target,
:mod:`betrace.sinks.span_upsert`); ``trace_summaries`` holds append-only
summary parts that the ``traces`` view merges; ``signals`` records every
signal once; ``_writer_sessions`` journals each writer open and close.
"""

from __future__ import annotations

#: One row per trace from its summary parts; the cold-storage reader runs the same query
#: over the archived parts (:mod:`betrace.archive.coldread`).
TRACES_VIEW_SQL = """SELECT trace_id,
       any_value(tenant) AS tenant,
       min(start_ns) AS start_ns,
       max(end_ns) AS end_ns,
       sum(span_count)::BIGINT AS span_count,
       sum(error_count)::BIGINT AS error_count,
       arg_min(root_name, start_ns) FILTER (WHERE root_name IS NOT NULL) AS root_name,
       arg_min(root_service, start_ns) FILTER (WHERE root_service IS NOT NULL) AS root_service,
       list_sort(list_distinct(flatten(list(services)))) AS services,
       min(ingested_ns) AS ingested_ns
FROM trace_summaries
GROUP BY trace_id"""

#: The span key from the hex ids: a 128- and a 64-bit integer. DuckDB's primary-key index
#: (an ART) inserts these much faster than the 32- and 16-character strings, and the key
#: check is most of an append's cost (measured: benchmarks/RESULTS.md, 2026-12-02).
SPAN_KEY_SQL = "('0x' || trace_id)::UHUGEINT, ('0x' || span_id)::UBIGINT"
#: The span columns as the sinks write them and the queries read them (the keys excluded).
SPAN_COLUMNS_SQL = "* EXCLUDE (trace_key, span_key)"

SPANS_TABLE_SQL = """
CREATE TABLE IF NOT EXISTS spans (
    tenant VARCHAR NOT NULL,
    trace_id VARCHAR NOT NULL,
    span_id VARCHAR NOT NULL,
    parent_span_id VARCHAR,
    name VARCHAR NOT NULL,
    service VARCHAR,
    kind TINYINT NOT NULL,
    status_code TINYINT NOT NULL,
    start_ns BIGINT NOT NULL,
    end_ns BIGINT NOT NULL,
    attributes JSON NOT NULL,
    resource_attributes JSON NOT NULL,
    produced_ms BIGINT NOT NULL,
    trace_key UHUGEINT NOT NULL,
    span_key UBIGINT NOT NULL,
    PRIMARY KEY (trace_key, span_key)
);
"""

#: Files written before the integer key: rebuild ``spans`` once, in one transaction.
SPANS_REKEY_SQL = f"""
BEGIN TRANSACTION;
ALTER TABLE spans RENAME TO _spans_varchar_key;
{SPANS_TABLE_SQL}
INSERT INTO spans SELECT *, {SPAN_KEY_SQL} FROM _spans_varchar_key;
DROP TABLE _spans_varchar_key;
COMMIT;
"""  # noqa: S608 - fixed SQL

SCHEMA_SQL = f"""
{SPANS_TABLE_SQL}
CREATE TABLE IF NOT EXISTS signals (
    signal_id VARCHAR PRIMARY KEY,
    tenant VARCHAR NOT NULL,
    rule_id VARCHAR NOT NULL,
    rule_version INTEGER NOT NULL,
    rule_name VARCHAR NOT NULL,
    trace_id VARCHAR NOT NULL,
    span_ids VARCHAR[] NOT NULL,
    severity VARCHAR NOT NULL,
    message VARCHAR NOT NULL,
    detected_at TIMESTAMPTZ NOT NULL,
    source_produced_ms BIGINT NOT NULL,
    emitted BOOLEAN NOT NULL DEFAULT FALSE
);
ALTER TABLE signals ADD COLUMN IF NOT EXISTS recorded_ns BIGINT;
CREATE TABLE IF NOT EXISTS trace_summaries (
    trace_id VARCHAR NOT NULL,
    tenant VARCHAR NOT NULL,
    start_ns BIGINT NOT NULL,
    end_ns BIGINT NOT NULL,
    span_count BIGINT NOT NULL,
    error_count BIGINT NOT NULL,
    root_name VARCHAR,
    root_service VARCHAR,
    services VARCHAR[] NOT NULL,
    ingested_ns BIGINT NOT NULL
);
CREATE OR REPLACE VIEW traces AS
{TRACES_VIEW_SQL};
"""

COMPACT_SQL = """
CREATE OR REPLACE TEMP TABLE _compacted AS SELECT * FROM traces;
DELETE FROM trace_summaries;
INSERT INTO trace_summaries
SELECT trace_id, tenant, start_ns, end_ns, span_count, error_count, root_name, root_service,
       services, ingested_ns
FROM _compacted;
DROP TABLE _compacted;
"""

SUMMARY_BACKFILL_SQL = (
    "SELECT trace_id, parent_span_id, name, service, status_code, start_ns, end_ns FROM spans"
)

WRITER_SESSIONS_SQL = """
CREATE TABLE IF NOT EXISTS _writer_sessions (
    pid INTEGER NOT NULL, opened_ns BIGINT NOT NULL, closed_ns BIGINT
);
"""


SIGNAL_COLUMNS = (
    "signal_id",
    "tenant",
    "rule_id",
    "rule_version",
    "rule_name",
    "trace_id",
    "span_ids",
    "severity",
    "message",
    "detected_at",
    "source_produced_ms",
)
