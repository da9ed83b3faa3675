"""The span store's upsert: one transaction per tenant batch (see :mod:`betrace.sinks.duckdb_store`).

A span is keyed by ``(trace_id, span_id)`` (as the integer columns ``trace_key``,
``span_key``: :data:`~betrace.sinks.store_schema.SPAN_KEY_SQL`); of two versions
the one with the later ``end_ns`` wins, and at the same end the higher-ranked status
(unset < error < ok: OpenTelemetry treats OK as final). The order is total, so
replays in any order converge on the same stored row.

The fast path assumes every key of the batch is new (the usual case: ingest
drops duplicates) and runs a plain ``INSERT``, whose primary-key check is an
ART lookup per row; the trace summaries are then appended straight from the
batch. DuckDB turns ``INSERT OR IGNORE`` / ``ON CONFLICT`` into a MERGE that
hash-joins the batch with a scan of every stored key, so each batch would cost
time in proportion to the table, and returning the stored rows to Arrow costs
more again. Only when the plain insert meets a known key (a replay, a newer
version, a key repeated within the batch) is it rolled back and the batch
upserted the slow way: ``INSERT OR IGNORE ... RETURNING`` for the new rows,
then an ``ON CONFLICT DO UPDATE`` pass for newer versions, with the summaries
of updated traces rebuilt from their stored spans (keeping ``ingested_ns``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import duckdb
import pyarrow as pa

from betrace.sinks.store_schema import SPAN_KEY_SQL

#: One summary part per trace from the rows an insert actually added (``_new``).
#: Parts are append-only (no index to maintain, so appends stay fast); the
#: ``traces`` view merges them, and :meth:`TenantStore.compact_summaries` folds
#: them into one row per trace. A trace's ``ingested_ns`` is its first part's.
SUMMARY_APPEND_SQL = """
INSERT INTO trace_summaries
SELECT trace_id,
       ? AS tenant,
       min(start_ns),
       max(end_ns),
       count(*),
       count(*) FILTER (WHERE status_code = 2),
       arg_min(name, start_ns) FILTER (WHERE parent_span_id IS NULL OR parent_span_id = ''),
       arg_min(service, start_ns) FILTER (WHERE parent_span_id IS NULL OR parent_span_id = ''),
       coalesce(list_distinct(list(service) FILTER (WHERE service IS NOT NULL)), []),
       ? + row_number() OVER (ORDER BY trace_id)
FROM _new
GROUP BY trace_id
"""
#: The fast path's summaries, straight from the batch (registering it twice costs ~0.8 ms).
SUMMARY_APPEND_BATCH_SQL = SUMMARY_APPEND_SQL.replace("FROM _new", "FROM _batch")
#: Fast path: every key is new, else a ConstraintException rolls the transaction back.
SPANS_APPEND_SQL = f"INSERT INTO spans SELECT *, {SPAN_KEY_SQL} FROM _batch"  # noqa: S608 - fixed
#: Slow path, first pass: store the new keys, return them for their summaries.
SPANS_INSERT_SQL = (
    f"INSERT OR IGNORE INTO spans SELECT *, {SPAN_KEY_SQL} FROM _batch "  # noqa: S608 - fixed
    "RETURNING trace_id, parent_span_id, name, service, status_code, start_ns, end_ns"
)
#: Slow path, second pass, only when the first stored fewer rows than the batch held:
#: the newest version of each key in the batch replaces an older stored one. Within
#: a batch a key may repeat (DO UPDATE may touch a row once), hence the QUALIFY.
_RANK = "CASE {t}.status_code WHEN 1 THEN 2 WHEN 2 THEN 1 ELSE 0 END"
SPANS_UPDATE_SQL = f"""
INSERT INTO spans
SELECT *, {SPAN_KEY_SQL} FROM _batch
QUALIFY row_number() OVER (
    PARTITION BY trace_id, span_id ORDER BY end_ns DESC, {_RANK.format(t="_batch")} DESC
) = 1
ON CONFLICT (trace_key, span_key) DO UPDATE SET
    parent_span_id = excluded.parent_span_id, name = excluded.name, service = excluded.service,
    kind = excluded.kind, status_code = excluded.status_code, start_ns = excluded.start_ns,
    end_ns = excluded.end_ns, attributes = excluded.attributes,
    resource_attributes = excluded.resource_attributes, produced_ms = excluded.produced_ms
WHERE excluded.end_ns > spans.end_ns
   OR (excluded.end_ns = spans.end_ns
       AND {_RANK.format(t="excluded")} > {_RANK.format(t="spans")})
RETURNING trace_id
"""  # noqa: S608 - fixed expressions
#: Rebuild the summary of traces whose spans were updated, keeping their first ``ingested_ns``.
SUMMARY_REBUILD_SQL = """
CREATE OR REPLACE TEMP TABLE _rebuilt AS
SELECT s.trace_id, ? AS tenant, min(s.start_ns) AS start_ns, max(s.end_ns) AS end_ns,
       count(*) AS span_count, count(*) FILTER (WHERE s.status_code = 2) AS error_count,
       arg_min(s.name, s.start_ns) FILTER (WHERE s.parent_span_id IS NULL OR s.parent_span_id = '')
           AS root_name,
       arg_min(s.service, s.start_ns) FILTER (WHERE s.parent_span_id IS NULL OR s.parent_span_id = '')
           AS root_service,
       coalesce(list_distinct(list(s.service) FILTER (WHERE s.service IS NOT NULL)), []) AS services,
       any_value(k.ingested_ns) AS ingested_ns
FROM spans s
JOIN (SELECT trace_id, min(ingested_ns) AS ingested_ns FROM trace_summaries
      WHERE trace_id IN (SELECT trace_id FROM _touched) GROUP BY trace_id) k USING (trace_id)
GROUP BY s.trace_id
"""
SUMMARY_REPLACE_SQL = """
DELETE FROM trace_summaries WHERE trace_id IN (SELECT trace_id FROM _touched);
INSERT INTO trace_summaries SELECT * FROM _rebuilt;
DROP TABLE _rebuilt;
"""

#: ``stamp(n)``: base of ``n`` strictly increasing ingest timestamps for the tenant.
Stamp = Callable[[int], int]


@dataclass(frozen=True, slots=True)
class UpsertResult:
    #: Keys stored for the first time.
    inserted: int
    #: Stored spans replaced by a newer version (later end, or a higher-ranked status).
    updated: int


def upsert_spans(con: duckdb.DuckDBPyConnection, tenant: str, table: pa.Table, stamp: Stamp) -> UpsertResult:
    """Upsert ``table`` (one tenant's spans) through the cursor ``con``, in one transaction."""
    con.register("_batch", table)
    try:
        if _append_new(con, tenant, table, stamp):
            return UpsertResult(table.num_rows, 0)
        return _upsert(con, tenant, table, stamp)
    finally:
        con.unregister("_batch")


def _append_new(con: duckdb.DuckDBPyConnection, tenant: str, table: pa.Table, stamp: Stamp) -> bool:
    """The fast path; ``False`` (and nothing written) when some key is stored already or repeats."""
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute(SPANS_APPEND_SQL)
    except duckdb.ConstraintException:
        # A known or repeated key, or a NULL where none may be: the slow path sorts
        # the first two out and fails on the third just as before.
        con.execute("ROLLBACK")
        return False
    except BaseException:
        con.execute("ROLLBACK")
        raise
    try:
        con.execute(SUMMARY_APPEND_BATCH_SQL, [tenant, stamp(table.num_rows)])  # every row is new
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")
    return True


def _upsert(con: duckdb.DuckDBPyConnection, tenant: str, table: pa.Table, stamp: Stamp) -> UpsertResult:
    """The slow path: insert the new keys, then replace older versions of the known ones."""
    con.execute("BEGIN TRANSACTION")
    try:
        new = con.sql(SPANS_INSERT_SQL).to_arrow_table()
        if new.num_rows:
            con.register("_new", new)
            con.execute(SUMMARY_APPEND_SQL, [tenant, stamp(new.num_rows)])
            con.unregister("_new")
        updated = 0
        if new.num_rows < table.num_rows:
            # Some keys were known: replays (nothing to do) or newer versions.
            touched = con.sql(SPANS_UPDATE_SQL).to_arrow_table()
            updated = touched.num_rows
            if updated:
                con.register("_touched", touched)
                con.execute(SUMMARY_REBUILD_SQL, [tenant])
                con.execute(SUMMARY_REPLACE_SQL)
                con.unregister("_touched")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")
    return UpsertResult(int(new.num_rows), int(updated))
