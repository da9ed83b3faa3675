"""The hot-store side of archival: which days are due, export to Parquet, and the cleanup.

Every function is blocking and runs on the tenant store's writer thread
(``TenantStore.run(..., lane="spans")``), so span inserts never interleave
with an export or a cleanup. The cleanup deletes exactly the rows that are in
the *verified* Parquet files (read back by key), never "everything of that
day": a span that arrived after the export stays hot and is archived later
as the next part.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from pathlib import Path

import duckdb
import pyarrow.parquet as pq

from betrace.archive import state
from betrace.archive.layout import FILES, day_start_ns
from betrace.archive.state import Unit
from betrace.sinks.duckdb_store import SUMMARY_APPEND_SQL
from betrace.sinks.store_schema import SPAN_COLUMNS_SQL

#: Rows per Parquet row group: small enough that a trace-id lookup reads little,
#: large enough that the footer stays small.
ROW_GROUP_ROWS = 65_536

#: Hot rows of one kind, by UTC day, that are due for archival (``?`` = first day kept hot).
DUE_SQL = {
    "spans": (
        "SELECT DISTINCT CAST(to_timestamp(start_ns // 1000000000) AT TIME ZONE 'UTC' AS DATE) AS day "
        "FROM traces WHERE start_ns < ? ORDER BY day"
    ),
    "signals": (
        "SELECT DISTINCT CAST(detected_at AT TIME ZONE 'UTC' AS DATE) AS day FROM signals "
        "WHERE emitted AND epoch_ns(detected_at) < ? ORDER BY day"
    ),
}

SELECT_SQL = {
    "spans": (
        f"SELECT {SPAN_COLUMNS_SQL} FROM spans WHERE trace_id IN (FROM _unit_traces) "  # noqa: S608 - fixed
        "ORDER BY trace_id, span_id"
    ),
    "traces": (
        "SELECT trace_id, tenant, start_ns, end_ns, span_count, error_count, root_name, root_service, "
        "services, ingested_ns FROM traces WHERE trace_id IN (FROM _unit_traces) ORDER BY trace_id"
    ),
    "signals": (
        "SELECT * EXCLUDE (emitted) FROM signals WHERE emitted AND epoch_ns(detected_at) >= ? "
        "AND epoch_ns(detected_at) < ? ORDER BY trace_id, signal_id"
    ),
}


def due_days(con: duckdb.DuckDBPyConnection, kind: str, before: dt.date) -> list[dt.date]:
    return [r[0] for r in con.execute(DUE_SQL[kind], [day_start_ns(before)]).fetchall()]


def staging_dir(data_dir: Path, tenant: str, unit: Unit) -> Path:
    return (
        data_dir
        / "archive-staging"
        / f"tenant={tenant}"
        / f"{unit.day.isoformat()}-{unit.kind}-{unit.part:04d}"
    )


def export(con: duckdb.DuckDBPyConnection, unit: Unit, keys: list[str], out_dir: Path) -> Unit:
    """Write the unit's Parquet files (zstd, sorted by trace id) into ``out_dir``; return the new unit.

    Runs in one read transaction, so every file of the unit sees the same snapshot.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    start, end = day_start_ns(unit.day), day_start_ns(unit.day + dt.timedelta(days=1))
    rows: list[int] = []
    lo = hi = None
    con.execute("BEGIN TRANSACTION")
    try:
        if unit.kind == "spans":
            con.execute(
                "CREATE OR REPLACE TEMP TABLE _unit_traces AS "
                "SELECT trace_id FROM traces WHERE start_ns >= ? AND start_ns < ?",
                [start, end],
            )
        for name, key in zip(FILES[unit.kind], keys, strict=True):
            target = out_dir / key.rpartition("/")[2]
            tmp = target.with_suffix(".parquet.tmp")
            params = [start, end] if name == "signals" else []
            sql = SELECT_SQL[name].replace("?", "$1", 1).replace("?", "$2", 1)
            con.execute(
                f"COPY ({sql}) TO '{tmp}' "
                f"(FORMAT parquet, COMPRESSION zstd, ROW_GROUP_SIZE {ROW_GROUP_ROWS})",
                params,
            )
            tmp.replace(target)  # a crash mid-COPY never leaves a half file under the final name
            rows.append(pq.read_metadata(target).num_rows)
            if name in ("spans", "signals"):
                col = "start_ns" if name == "spans" else "epoch_ns(detected_at)"
                r = con.execute(f"SELECT min({col}), max({col}) FROM read_parquet('{target}')").fetchone()  # noqa: S608
                lo, hi = (r[0], r[1]) if r else (None, None)
        if unit.kind == "spans":
            con.execute("DROP TABLE _unit_traces")
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return dataclasses.replace(
        unit, keys=tuple(keys), file_rows=tuple(rows), rows=rows[0], min_ns=lo, max_ns=hi
    )


def cleanup(con: duckdb.DuckDBPyConnection, tenant: str, unit: Unit, files: list[Path]) -> tuple[Unit, int]:
    """Delete exactly the archived rows and move the unit to ``cleaned``, in one transaction."""
    primary = str(files[0])
    con.execute("BEGIN TRANSACTION")
    try:
        if unit.kind == "spans":
            copy = f"SELECT trace_id, span_id FROM read_parquet('{primary}')"  # noqa: S608 - our own path
            con.execute(f"CREATE OR REPLACE TEMP TABLE _archived AS {copy}")
            row = con.execute(
                "DELETE FROM spans USING _archived a "
                "WHERE spans.trace_id = a.trace_id AND spans.span_id = a.span_id"
            ).fetchone()
            deleted = int(row[0]) if row else 0
            con.execute("CREATE OR REPLACE TEMP TABLE _touched AS SELECT DISTINCT trace_id FROM _archived")
            con.execute("DELETE FROM trace_summaries WHERE trace_id IN (FROM _touched)")
            # Spans of these traces that arrived after the export stay hot: give them a summary.
            late = con.sql(
                "SELECT trace_id, parent_span_id, name, service, status_code, start_ns, end_ns FROM spans "
                "WHERE trace_id IN (FROM _touched)"
            ).to_arrow_table()
            if late.num_rows:
                con.register("_new", late)
                try:
                    con.execute(SUMMARY_APPEND_SQL, [tenant, time.time_ns()])
                finally:
                    con.unregister("_new")
            con.execute("DROP TABLE _archived")
            con.execute("DROP TABLE _touched")
        else:
            row = con.execute(
                f"DELETE FROM signals WHERE signal_id IN (SELECT signal_id FROM read_parquet('{primary}'))"  # noqa: S608
            ).fetchone()
            deleted = int(row[0]) if row else 0
        cleaned = dataclasses.replace(unit, state="cleaned", last_good="cleaned", reason=None)
        state.upsert(con, cleaned)
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return cleaned, deleted
