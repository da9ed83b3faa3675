"""DuckDB hot trace storage: one file per tenant, batched Arrow appends.

Exactly one process writes a tenant file (DuckDB allows one writer). DuckDB
also refuses a read-only open from another process while the writer holds the
file, so: the query API served *inside* the worker reads through the owner's
connection (:meth:`TenantStore.cursor`), and other processes (``betrace
serve``, CLI queries) open read-only per request and get a clear
:class:`StoreBusyError` (retriable) while a worker owns the file.

Inserts are ``INSERT OR IGNORE`` on the primary keys, so a replayed batch
stores nothing twice. Every span insert also maintains ``trace_summaries``
(one row per trace) from exactly the rows that were new, in the same
transaction, so summaries never count a replayed span. Each new summary and
signal gets an ``ingested_ns``/``recorded_ns``: a per-file, strictly
increasing nanosecond timestamp that never changes afterwards — the key of
the query API's cursors.

Retention (:meth:`TenantStore.apply_retention`) removes traces older than the
retention period only up to what the archive hook reports as archived; with no
archiver nothing is ever deleted, and the backlog is logged.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import duckdb
import pyarrow as pa

from betrace.errors import SinkError
from betrace.metrics import StageHooks
from betrace.sinks.base import BatchingSink
from betrace.streams.topics import split_by_tenant

logger = logging.getLogger(__name__)

SCHEMA_SQL = """
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
    PRIMARY KEY (trace_id, span_id)
);
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
SELECT trace_id,
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
GROUP BY trace_id;
"""

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

COMPACT_SQL = """
CREATE OR REPLACE TEMP TABLE _compacted AS SELECT * FROM traces;
DELETE FROM trace_summaries;
INSERT INTO trace_summaries
SELECT trace_id, tenant, start_ns, end_ns, span_count, error_count, root_name, root_service,
       services, ingested_ns
FROM _compacted;
DROP TABLE _compacted;
"""

SPANS_INSERT_SQL = (
    "INSERT OR IGNORE INTO spans SELECT * FROM _batch "
    "RETURNING trace_id, parent_span_id, name, service, status_code, start_ns, end_ns"
)
SUMMARY_BACKFILL_SQL = (
    "SELECT trace_id, parent_span_id, name, service, status_code, start_ns, end_ns FROM spans"
)

DAY_S = 86_400.0


class StoreBusyError(SinkError):
    """A tenant file is held by another process (the worker that owns it); retry later."""

    retriable = True


class ArchiveStatus(Protocol):
    """The archival hook: how far a tenant's traces are safely archived (PRD-002d)."""

    def archived_until_ns(self, tenant: str) -> int | None:
        """Every trace that ended before this time (ns) is archived; ``None``: nothing is."""
        ...


class NothingArchived:
    """The default until archival exists: nothing is archived, so retention deletes nothing."""

    def archived_until_ns(self, tenant: str) -> int | None:
        return None


@dataclass(frozen=True, slots=True)
class RetentionResult:
    tenant: str
    deleted_traces: int
    deleted_spans: int
    #: Traces past the retention period that are kept because they are not archived yet.
    awaiting_archive: int


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


class TenantStore:
    """Owner of every tenant DuckDB file in this process."""

    def __init__(self, data_dir: Path, *, read_only: bool = False) -> None:
        self.data_dir = data_dir
        self.read_only = read_only
        self._conns: dict[str, duckdb.DuckDBPyConnection] = {}
        self._lock = threading.RLock()  # _open (under the lock) sets the ingest clock
        self._clock: dict[str, int] = {}
        # DuckDB work runs off the event loop. Span appends and signal writes get a
        # thread each, so small signal batches never queue behind large span batches.
        self._executors = {
            lane: ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"betrace-duckdb-{lane}")
            for lane in ("spans", "signals")
        }

    def path(self, tenant: str) -> Path:
        return self.data_dir / f"tenant={tenant}.duckdb"

    def tenants(self) -> list[str]:
        if not self.data_dir.is_dir():
            return []
        return sorted(p.name[len("tenant=") : -len(".duckdb")] for p in self.data_dir.glob("tenant=*.duckdb"))

    def connection(self, tenant: str) -> duckdb.DuckDBPyConnection:
        with self._lock:
            con = self._conns.get(tenant)
            if con is None:
                con = self._open(tenant)
                self._conns[tenant] = con
            return con

    def _open(self, tenant: str) -> duckdb.DuckDBPyConnection:
        path = self.path(tenant)
        try:
            if self.read_only:
                if not path.exists():
                    msg = f"no data for tenant {tenant!r} ({path} does not exist)"
                    raise SinkError(msg)
                return duckdb.connect(str(path), read_only=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            con = duckdb.connect(str(path))
            had_summaries = bool(
                con.execute(
                    "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'trace_summaries'"
                ).fetchone()
                == (1,)
            )
            con.execute(SCHEMA_SQL)
            self._migrate(con, tenant, backfill=not had_summaries)
        except duckdb.Error as exc:
            if "lock" in str(exc).lower():
                msg = (
                    f"tenant {tenant!r}: {path} is held by another process (the worker that owns it); "
                    "DuckDB allows no reads from other processes meanwhile: use the worker's query API "
                    "or retry when it has stopped"
                )
                raise StoreBusyError(msg) from None
            msg = f"cannot open {path}: {exc}"
            raise SinkError(msg) from exc
        return con

    def _migrate(self, con: duckdb.DuckDBPyConnection, tenant: str, *, backfill: bool) -> None:
        """Bring files written by earlier versions up to date; set the ingest clock."""
        con.execute("UPDATE signals SET recorded_ns = epoch_ns(detected_at) WHERE recorded_ns IS NULL")
        if backfill:
            con.register("_new", con.sql(SUMMARY_BACKFILL_SQL).to_arrow_table())
            try:
                con.execute(SUMMARY_APPEND_SQL, [tenant, 0])
            finally:
                con.unregister("_new")
        row = con.execute(
            "SELECT greatest((SELECT coalesce(max(ingested_ns), 0) FROM trace_summaries),"
            " (SELECT coalesce(max(recorded_ns), 0) FROM signals))"
        ).fetchone()
        with self._lock:
            self._clock[tenant] = int(row[0]) if row else 0

    def _stamp(self, tenant: str, n: int) -> int:
        """Base of ``n`` strictly increasing ingest timestamps (base+1 .. base+n) for ``tenant``."""
        with self._lock:
            base = max(time.time_ns(), self._clock.get(tenant, 0))
            self._clock[tenant] = base + n
        return base

    async def run(self, fn: Any, *args: Any, lane: str = "spans") -> Any:
        """Run a blocking DuckDB call on the writer thread of ``lane``."""
        return await asyncio.get_running_loop().run_in_executor(self._executors[lane], fn, *args)

    def insert_spans(self, tenant: str, table: pa.Table) -> int:
        """Append spans and update their traces' summaries; return how many spans were new."""
        con = self.connection(tenant).cursor()
        try:
            con.execute("BEGIN TRANSACTION")
            try:
                con.register("_batch", table)
                new = con.sql(SPANS_INSERT_SQL).to_arrow_table()
                if new.num_rows:
                    con.register("_new", new)
                    con.execute(SUMMARY_APPEND_SQL, [tenant, self._stamp(tenant, new.num_rows)])
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
            return int(new.num_rows)
        except duckdb.Error as exc:
            msg = f"tenant {tenant!r}: span insert failed: {exc}"
            raise SinkError(msg) from exc
        finally:
            con.close()

    def insert_signals(self, tenant: str, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Record signals; return those not yet emitted (new ones and earlier failures)."""
        con = self.connection(tenant).cursor()
        try:
            table = pa.Table.from_pylist([{c: d[c] for c in SIGNAL_COLUMNS} for d in docs])
            con.register("_signals", table)
            cols = ", ".join(SIGNAL_COLUMNS)
            con.execute(
                f"INSERT OR IGNORE INTO signals ({cols}, recorded_ns) "  # noqa: S608 - fixed column list
                f"SELECT {cols.replace('detected_at', 'CAST(detected_at AS TIMESTAMPTZ)')}, "
                "? + row_number() OVER () FROM _signals",
                [self._stamp(tenant, len(docs))],
            )
            ids = [d["signal_id"] for d in docs]
            rows = con.execute(
                "SELECT signal_id FROM signals WHERE NOT emitted AND list_contains(?, signal_id)", [ids]
            ).fetchall()
        except duckdb.Error as exc:
            msg = f"tenant {tenant!r}: signal insert failed: {exc}"
            raise SinkError(msg) from exc
        finally:
            con.close()
        pending = {r[0] for r in rows}
        out, seen = [], set()
        for doc in docs:
            if doc["signal_id"] in pending and doc["signal_id"] not in seen:
                seen.add(doc["signal_id"])
                out.append(doc)
        return out

    def mark_emitted(self, tenant: str, signal_ids: list[str]) -> None:
        con = self.connection(tenant).cursor()
        try:
            con.execute("UPDATE signals SET emitted = TRUE WHERE list_contains(?, signal_id)", [signal_ids])
        except duckdb.Error as exc:
            msg = f"tenant {tenant!r}: marking signals emitted failed: {exc}"
            raise SinkError(msg) from exc
        finally:
            con.close()

    def span_counts(self) -> dict[str, tuple[int, int]]:
        """Per tenant: stored span rows and distinct ``(trace_id, span_id)`` keys."""
        counts = {}
        for tenant in self.tenants():
            with self.cursor(tenant) as con:
                row = con.execute(
                    "SELECT count(*), count(DISTINCT (trace_id, span_id)) FROM spans"
                ).fetchone()
            counts[tenant] = (int(row[0]), int(row[1])) if row else (0, 0)
        return counts

    @contextmanager
    def cursor(self, tenant: str) -> Iterator[duckdb.DuckDBPyConnection]:
        con = self.connection(tenant).cursor()
        try:
            yield con
        finally:
            con.close()

    def compact_summaries(self, tenant: str) -> None:
        """Fold the summary parts into one row per trace (same view, fewer rows to merge)."""
        with self.cursor(tenant) as con:
            try:
                con.execute("BEGIN TRANSACTION")
                con.execute(COMPACT_SQL)
                con.execute("COMMIT")
            except duckdb.Error as exc:
                msg = f"tenant {tenant!r}: compacting trace summaries failed: {exc}"
                raise SinkError(msg) from exc

    def has_tenant(self, tenant: str) -> bool:
        """Whether ``tenant`` has a file (readers must not create one by asking)."""
        with self._lock:
            if tenant in self._conns:
                return True
        return self.path(tenant).exists()

    def apply_retention(
        self,
        tenant: str,
        *,
        retention_s: float = 7 * DAY_S,
        archive: ArchiveStatus | None = None,
        now_ns: int | None = None,
    ) -> RetentionResult:
        """Delete whole traces that ended more than ``retention_s`` ago *and* are archived.

        Never deletes un-archived data: traces past retention that the archive hook
        does not cover are kept, counted in ``awaiting_archive`` and logged.
        """
        now = time.time_ns() if now_ns is None else now_ns
        cutoff = now - int(retention_s * 1e9)
        archived = (archive or NothingArchived()).archived_until_ns(tenant)
        limit = min(cutoff, archived) if archived is not None else None
        with self.cursor(tenant) as con:
            try:
                row = con.execute(
                    "SELECT count(*) FROM trace_summaries WHERE end_ns < ?", [cutoff]
                ).fetchone()
                expired = int(row[0]) if row else 0
                traces = spans = 0
                if limit is not None and expired:
                    con.execute("BEGIN TRANSACTION")
                    con.execute(
                        "CREATE OR REPLACE TEMP TABLE _doomed AS "
                        "SELECT trace_id FROM traces WHERE end_ns < ?",
                        [limit],
                    )
                    row = con.execute("SELECT count(*) FROM _doomed").fetchone()
                    traces = int(row[0]) if row else 0
                    row = con.execute("DELETE FROM spans WHERE trace_id IN (FROM _doomed)").fetchone()
                    spans = int(row[0]) if row else 0
                    con.execute("DELETE FROM trace_summaries WHERE trace_id IN (FROM _doomed)")
                    con.execute("DROP TABLE _doomed")
                    con.execute("COMMIT")
            except duckdb.Error as exc:
                msg = f"tenant {tenant!r}: retention failed: {exc}"
                raise SinkError(msg) from exc
        waiting = expired - traces
        if waiting:
            logger.warning(
                "tenant %r: %d traces are past the %.1f-day retention but not archived; keeping them",
                tenant,
                waiting,
                retention_s / DAY_S,
            )
        if traces:
            logger.info("tenant %r: retention removed %d archived traces (%d spans)", tenant, traces, spans)
        return RetentionResult(tenant, traces, spans, waiting)

    def close(self) -> None:
        """Finish in-flight writes, then close every tenant file."""
        for executor in self._executors.values():
            executor.shutdown(wait=True)
        with self._lock:
            for con in self._conns.values():
                con.close()
            self._conns.clear()


class SpanStoreSink(BatchingSink[pa.Table]):
    """Batched Arrow appends of spans into each tenant's DuckDB file."""

    step_id = "duckdb"

    def __init__(self, store: TenantStore, *, max_rows: int, hooks: StageHooks) -> None:
        super().__init__(max_items=max_rows, hooks=hooks)
        self.store = store
        self.stored = 0

    async def write(self, batch: list[pa.Table]) -> None:
        self.stored += await self.store.run(self._write_sync, batch)

    def _write_sync(self, batch: list[pa.Table]) -> int:
        table = pa.concat_tables(batch)
        return sum(self.store.insert_spans(t, part) for t, part in split_by_tenant(table))
