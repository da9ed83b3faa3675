"""DuckDB hot trace storage: one file per tenant, batched Arrow appends.

Exactly one process writes a tenant file (DuckDB allows one writer); other
processes open it read-only. Inserts are ``INSERT OR IGNORE`` on the primary
keys, so a replayed batch stores nothing twice.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


class TenantStore:
    """Owner of every tenant DuckDB file in this process."""

    def __init__(self, data_dir: Path, *, read_only: bool = False) -> None:
        self.data_dir = data_dir
        self.read_only = read_only
        self._conns: dict[str, duckdb.DuckDBPyConnection] = {}
        self._lock = threading.Lock()
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
            con.execute(SCHEMA_SQL)
        except duckdb.Error as exc:
            msg = f"cannot open {path}: {exc}"
            raise SinkError(msg) from exc
        return con

    async def run(self, fn: Any, *args: Any, lane: str = "spans") -> Any:
        """Run a blocking DuckDB call on the writer thread of ``lane``."""
        return await asyncio.get_running_loop().run_in_executor(self._executors[lane], fn, *args)

    def insert_spans(self, tenant: str, table: pa.Table) -> int:
        """Append spans; return how many were new."""
        con = self.connection(tenant).cursor()
        try:
            con.register("_batch", table)
            row = con.execute("INSERT OR IGNORE INTO spans SELECT * FROM _batch").fetchone()
            return int(row[0]) if row else 0
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
                f"INSERT OR IGNORE INTO signals ({cols}) "  # noqa: S608 - fixed column list
                f"SELECT {cols.replace('detected_at', 'CAST(detected_at AS TIMESTAMPTZ)')} FROM _signals"
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
