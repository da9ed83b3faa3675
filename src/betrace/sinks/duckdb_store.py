"""DuckDB hot trace storage: one file per tenant, batched Arrow appends.

The files of a process are attached to one in-memory DuckDB instance (one
buffer pool under one memory limit, one thread pool); each call works on a
cursor that ``USE``s its tenant's file.

Exactly one process writes a tenant file (DuckDB allows one writer). With
several downstream workers, a tenant belongs to the worker that holds its
partition (:func:`betrace.streams.topics.tenant_partition`) of ``betrace.store``
and ``betrace.signals.pending``: :meth:`TenantStore.track_ownership` makes the
store refuse (:class:`NotOwnerError`) to open any other tenant for writing,
:meth:`TenantStore.release` closes the files of revoked partitions after the
writes in flight, and an open that meets the previous owner's lock retries with
backoff for ``open_timeout_s``. Every writer open and close is journaled in
the file's ``_writer_sessions`` table (pid, opened, closed), which shows who
wrote a file when. DuckDB also refuses a read-only open from another process
while the writer holds the file, so: the query API served *inside* the worker
reads owned tenants through the owner's connection (:meth:`TenantStore.cursor`)
and other tenants through a short read-only open that fails with a retriable
:class:`StoreBusyError` while their owner holds the file; other processes
(``betrace serve``, CLI queries) open read-only per request the same way.

Spans are upserted on ``(trace_id, span_id)``: a replayed batch stores
nothing twice, and a span seen again in a *newer version* — a later end time,
or at the same end a status ranked higher (unset < error < ok, OK being final
in OpenTelemetry) — replaces the stored row. The order is total, so replays in
any order converge on the same row. The fast path is one plain ``INSERT``
(the primary key's ART refuses known keys); only when it meets a known key
is the batch rolled back and upserted with ``INSERT OR IGNORE`` plus an
``ON CONFLICT DO UPDATE`` pass (:mod:`betrace.sinks.span_upsert`). The
schema and fixed SQL are in :mod:`betrace.sinks.store_schema`. Every span insert also maintains
``trace_summaries`` (one row per trace) from exactly the rows that were new, in
the same transaction, so summaries never count a replayed span; a trace with
an updated span has its summary parts recomputed from its stored spans (its
``ingested_ns`` is kept). Each new summary and
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
import os
import random
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
from betrace.resilience.breakers import Breaker
from betrace.resilience.guard import SpooledWriter
from betrace.sinks.attached import AttachedFiles, spill_dir
from betrace.sinks.base import BatchingSink
from betrace.sinks.span_upsert import SUMMARY_APPEND_SQL, UpsertResult, upsert_spans
from betrace.sinks.store_schema import (
    COMPACT_SQL,
    SCHEMA_SQL,
    SIGNAL_COLUMNS,
    SPANS_REKEY_SQL,
    SUMMARY_BACKFILL_SQL,
    WRITER_SESSIONS_SQL,
)
from betrace.streams.topics import split_by_tenant, tenant_partition

logger = logging.getLogger(__name__)

# Archival and the synthetic-data tools build files with the store's SQL from here.
__all__ = [
    "SCHEMA_SQL",
    "SUMMARY_APPEND_SQL",
    "ArchiveStatus",
    "NotOwnerError",
    "NothingArchived",
    "RetentionResult",
    "SpanStoreSink",
    "StoreBusyError",
    "TenantStore",
    "UpsertResult",
]

DAY_S = 86_400.0
#: WAL size that triggers a checkpoint of a tenant file (DuckDB's default is 16 MB).
DEFAULT_CHECKPOINT_MIB = 128
#: Block cache of the one DuckDB instance that holds every tenant file of a process.
DEFAULT_MEMORY_MIB = 256
#: DuckDB's row group. A transaction of whole groups appends 1.4-1.8x faster than one that
#: ends in (or must first fill) a partial group (benchmarks/RESULTS.md, 2026-12-02).
ROW_GROUP_ROWS = 122_880


def _barrier() -> None:
    """Queued on a lane's thread: returns once everything queued before it has run."""


class StoreBusyError(SinkError):
    """A tenant file is held by another process (the worker that owns it); retry later."""

    retriable = True


class NotOwnerError(StoreBusyError):
    """Another worker owns the tenant's partition (and so its file); retry after a rebalance."""


def _binds(con: duckdb.DuckDBPyConnection, sql: str) -> bool:
    """Whether ``sql`` binds: a probe of the schema (the catalog functions cost ~10 ms a file)."""
    try:
        con.execute(sql)
    except duckdb.CatalogException:
        return False
    except duckdb.BinderException:
        return False
    return True


def _spans_keyed_by_strings(con: duckdb.DuckDBPyConnection) -> bool:
    """A file from before the integer span key: a ``spans`` table without ``trace_key``."""
    return _binds(con, "SELECT 1 FROM spans LIMIT 0") and not _binds(
        con, "SELECT trace_key FROM spans LIMIT 0"
    )


def _is_lock_error(exc: duckdb.Error) -> bool:
    text = str(exc).lower()
    return "lock" in text or "conflicting" in text


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


class TenantStore:
    """Owner of every tenant DuckDB file in this process.

    The files are attached to one DuckDB instance (:class:`AttachedFiles`, made
    here or shared with the tenant ledgers): one block cache under one limit and
    one thread pool for all tenants.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        read_only: bool = False,
        open_timeout_s: float = 30.0,
        checkpoint_mib: int = DEFAULT_CHECKPOINT_MIB,
        memory_mib: int = DEFAULT_MEMORY_MIB,
        files: AttachedFiles | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.read_only = read_only
        #: Each checkpoint rewrites the primary-key index, so with DuckDB's 16 MB default a
        #: growing file spent more time checkpointing than appending (benchmarks/RESULTS.md).
        self.checkpoint_mib = checkpoint_mib
        #: How long a writer open waits out another process's lock (the previous owner closing).
        self.open_timeout_s = open_timeout_s
        #: The DuckDB instance the tenant files are attached to; closed here only if made here.
        self._owns_files = files is None
        self.files = files or AttachedFiles(
            memory_mib=memory_mib,
            temp_dir=spill_dir(data_dir),
            settings={"checkpoint_threshold": f"{int(checkpoint_mib)}MiB"},
        )
        self._conns: dict[str, duckdb.DuckDBPyConnection] = {}  # tenant -> cursor using its file
        self._names: dict[str, str] = {}  # tenant -> its file's name in the instance
        #: ``None``: this store owns every tenant (CLI, tests, one worker without tracking).
        self._partitions: int | None = None
        self._owned: frozenset[int] = frozenset()
        self._readers: dict[str, int] = {}  # cursors handed out per tenant (API reads)
        self._sessions: dict[str, int] = {}  # tenant -> opened_ns of this process's writer session
        self._lock = threading.RLock()  # _open (under the lock) sets the ingest clock
        self._clock: dict[str, int] = {}
        # DuckDB work runs off the event loop. Span appends and signal writes get a
        # thread each, so small signal batches never queue behind large span batches.
        self._executors = {
            lane: ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"betrace-duckdb-{lane}")
            for lane in ("spans", "signals", "integrity")
        }

    def path(self, tenant: str) -> Path:
        return self.data_dir / f"tenant={tenant}.duckdb"

    def all_tenants(self) -> list[str]:
        """Every tenant with a file in ``data_dir``, owned or not."""
        if not self.data_dir.is_dir():
            return []
        return sorted(p.name[len("tenant=") : -len(".duckdb")] for p in self.data_dir.glob("tenant=*.duckdb"))

    def tenants(self) -> list[str]:
        """The tenants this store may write: all of them, or the owned ones when tracking.

        Periodic jobs that write tenant files (retention, archival, integrity
        rechecks) iterate this, so in a worker they only touch owned tenants.
        """
        return [t for t in self.all_tenants() if self.owns(t)]

    # -- ownership (several downstream workers) -------------------------------------------------

    def track_ownership(self, partitions: int) -> None:
        """Own only tenants whose partition (out of ``partitions``) is assigned; none until then."""
        with self._lock:
            self._partitions = partitions
            self._owned = frozenset()

    @property
    def tracking(self) -> bool:
        return self._partitions is not None

    @property
    def owned_partitions(self) -> frozenset[int]:
        return self._owned

    def partition_of(self, tenant: str) -> int | None:
        return None if self._partitions is None else tenant_partition(tenant, self._partitions)

    def owns(self, tenant: str) -> bool:
        """Whether this process may open ``tenant``'s file for writing now."""
        partitions = self._partitions
        return partitions is None or tenant_partition(tenant, partitions) in self._owned

    def owned_tenants(self) -> list[str]:
        """Tenants with a file that this process owns now (the same as :meth:`tenants`)."""
        return self.tenants()

    def assign(self, partitions: set[int]) -> None:
        """Partitions assigned to this worker: their tenants may be opened from now on."""
        with self._lock:
            self._owned = frozenset(partitions)
        logger.info("store: owning tenant partitions %s", sorted(partitions))

    async def release(self, partitions: set[int] | None = None) -> list[str]:
        """Give up ``partitions`` (all when ``None``): no new writes, then close their tenants' files.

        Writes already queued on a lane finish first (each lane is one thread, so
        a no-op behind them is a barrier); API readers get up to 5 s to finish.
        Returns the tenants whose files were closed.
        """
        with self._lock:
            self._owned = frozenset() if partitions is None else self._owned - partitions
            doomed = [t for t in self._conns if not self.owns(t)]
        if not doomed:
            return []
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(loop.run_in_executor(ex, _barrier) for ex in self._executors.values() if not ex._shutdown)
        )
        await asyncio.to_thread(self._close_tenants, doomed)
        logger.info("store: released tenants %s", doomed)
        return doomed

    def _close_tenants(self, tenants: list[str]) -> None:
        deadline = time.monotonic() + 5.0
        for tenant in tenants:
            while self._readers.get(tenant) and time.monotonic() < deadline:
                time.sleep(0.01)
            with self._lock:
                con = self._conns.pop(tenant, None)
                if con is None or self.owns(tenant):  # reassigned meanwhile: keep it
                    if con is not None:
                        self._conns[tenant] = con
                    continue
                self._close_connection(tenant, con)

    def _close_connection(self, tenant: str, con: duckdb.DuckDBPyConnection) -> None:
        """Journal the session's end, then detach the file (which checkpoints it and drops its lock)."""
        opened = self._sessions.pop(tenant, None)
        try:
            if opened is not None:
                con.execute(
                    "UPDATE _writer_sessions SET closed_ns = ? WHERE pid = ? AND opened_ns = ?",
                    [time.time_ns(), os.getpid(), opened],
                )
        except duckdb.Error as exc:
            logger.warning("tenant %r: could not journal the writer session's end: %s", tenant, exc)
        finally:
            con.close()
            self._detach(tenant)

    def _detach(self, tenant: str) -> None:
        name = self._names.pop(tenant, None)
        if name is None:
            return
        try:
            self.files.detach(name)
        except duckdb.Error as exc:
            logger.warning("tenant %r: detaching its file failed: %s", tenant, exc)

    def connection(self, tenant: str) -> duckdb.DuckDBPyConnection:
        if not self.read_only and not self.owns(tenant):
            msg = (
                f"tenant {tenant!r} (partition {self.partition_of(tenant)}) is owned by another worker; "
                "its writes wait for a rebalance to bring it here"
            )
            raise NotOwnerError(msg)
        with self._lock:
            con = self._conns.get(tenant)
            if con is None:
                con = self._open(tenant)
                self._conns[tenant] = con
            return con

    def _cursor(self, tenant: str) -> duckdb.DuckDBPyConnection:
        """A new cursor on ``tenant``'s file, for one call on one thread; the caller closes it."""
        with self._lock:
            self.connection(tenant)
            name = self._names[tenant]
        return self.files.cursor(name)

    def _attach(self, tenant: str, path: Path) -> duckdb.DuckDBPyConnection:
        """Attach ``path`` to the instance; the tenant's long-lived cursor on it."""
        name = self.files.attach(path, read_only=self.read_only)
        self._names[tenant] = name
        return self.files.cursor(name)

    def _open(self, tenant: str) -> duckdb.DuckDBPyConnection:
        path = self.path(tenant)
        try:
            if self.read_only:
                if not path.exists():
                    msg = f"no data for tenant {tenant!r} ({path} does not exist)"
                    raise SinkError(msg)
                return self._attach(tenant, path)
            path.parent.mkdir(parents=True, exist_ok=True)
            con = self._connect_writer(tenant, path)
            had_summaries = _binds(con, "SELECT 1 FROM trace_summaries LIMIT 0")
            if _spans_keyed_by_strings(con):
                logger.info("store: tenant %r: re-keying spans on integer ids (once per file)", tenant)
                con.execute(SPANS_REKEY_SQL)
            con.execute(SCHEMA_SQL)
            self._migrate(con, tenant, backfill=not had_summaries)
            con.execute(WRITER_SESSIONS_SQL)
            opened = time.time_ns()
            con.execute("INSERT INTO _writer_sessions VALUES (?, ?, NULL)", [os.getpid(), opened])
            self._sessions[tenant] = opened
        except duckdb.Error as exc:
            self._detach(tenant)  # attached but not set up: nothing may use it half-migrated
            if _is_lock_error(exc):
                msg = (
                    f"tenant {tenant!r}: {path} is held by another process (the worker that owns it); "
                    "DuckDB allows no reads from other processes meanwhile: use the worker's query API "
                    "or retry when it has stopped"
                )
                raise StoreBusyError(msg) from None
            msg = f"cannot open {path}: {exc}"
            raise SinkError(msg) from exc
        return con

    def _connect_writer(self, tenant: str, path: Path) -> duckdb.DuckDBPyConnection:
        """Open for writing; wait out another process's lock (a previous owner closing) for a while."""
        deadline = time.monotonic() + self.open_timeout_s
        delay, waited = 0.01, False
        while True:
            try:
                con = self._attach(tenant, path)
            except duckdb.Error as exc:
                if not _is_lock_error(exc) or time.monotonic() >= deadline:
                    raise
                waited = True
                time.sleep(delay * (0.5 + random.random()))  # noqa: S311 - jitter, not crypto
                delay = min(delay * 2, 0.25)
                continue
            if waited:
                logger.info("store: %s was held by another process; opened after waiting", path.name)
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
        """Upsert spans and update their traces' summaries; return how many spans were new."""
        return self.upsert_spans(tenant, table).inserted

    def upsert_spans(self, tenant: str, table: pa.Table) -> UpsertResult:
        """Store new spans, replace older versions of known ones; one transaction per batch."""
        con = self._cursor(tenant)
        try:
            return upsert_spans(con, tenant, table, lambda n: self._stamp(tenant, n))
        except duckdb.Error as exc:
            msg = f"tenant {tenant!r}: span insert failed: {exc}"
            raise SinkError(msg) from exc
        finally:
            con.close()

    def insert_signals(self, tenant: str, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Record signals; return those not yet emitted (new ones and earlier failures)."""
        return self.record_signals(tenant, docs)[1]

    def record_signals(
        self, tenant: str, docs: list[dict[str, Any]]
    ) -> tuple[dict[str, int], list[dict[str, Any]]]:
        """Record signals; return (recorded earlier and never marked emitted: id -> recorded_ns,
        every doc not yet emitted, first occurrence of each id).

        Those recorded earlier may have been published by a worker that died before
        marking them; the signal sink checks the topic before publishing them again.
        One read of the ids, then one insert of the new ones: each DuckDB call from the
        sink's thread waits for the GIL while the event loop is busy, so they are few.
        """
        first: dict[str, dict[str, Any]] = {}
        for doc in docs:
            first.setdefault(doc["signal_id"], doc)
        con = self._cursor(tenant)
        try:
            table = pa.Table.from_pylist([{c: d[c] for c in SIGNAL_COLUMNS} for d in docs])
            con.register("_signals", table)
            # A join, not list_contains(?, signal_id): that scans the whole table once per
            # id and made a 100k-signal spool replay quadratic (issue 7, bench_spool.py).
            rows = con.execute(
                "SELECT s.signal_id, s.emitted, coalesce(s.recorded_ns, 0) FROM signals s"
                " SEMI JOIN (SELECT DISTINCT signal_id FROM _signals) b ON s.signal_id = b.signal_id"
            ).fetchall()
            known = {str(r[0]): (bool(r[1]), int(r[2])) for r in rows}
            if len(known) < len(first):
                cols = ", ".join(SIGNAL_COLUMNS)
                con.execute(
                    f"INSERT OR IGNORE INTO signals ({cols}, recorded_ns) "  # noqa: S608 - fixed column list
                    f"SELECT {cols.replace('detected_at', 'CAST(detected_at AS TIMESTAMPTZ)')}, "
                    "? + row_number() OVER () FROM _signals",
                    [self._stamp(tenant, len(docs))],
                )
        except duckdb.Error as exc:
            msg = f"tenant {tenant!r}: signal insert failed: {exc}"
            raise SinkError(msg) from exc
        finally:
            con.close()
        earlier = {sid: ns for sid, (emitted, ns) in known.items() if not emitted}
        return earlier, [doc for sid, doc in first.items() if sid in earlier or sid not in known]

    def mark_emitted(self, tenant: str, signal_ids: list[str]) -> None:
        con = self._cursor(tenant)
        try:
            con.register("_emitted", pa.table({"signal_id": pa.array(signal_ids, pa.string())}))
            con.execute(
                "UPDATE signals SET emitted = TRUE FROM (SELECT DISTINCT signal_id FROM _emitted) e"
                " WHERE signals.signal_id = e.signal_id AND NOT signals.emitted"
            )
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
        """A cursor on ``tenant``'s file: the owner's connection, else a short read-only open.

        A tenant another worker owns is opened read-only for the duration; that
        fails with a retriable :class:`StoreBusyError` while its owner holds the
        file (DuckDB's lock), and any write through it fails.
        """
        if not self.read_only and not self.owns(tenant):
            with self._read_only(tenant) as ro:
                yield ro
            return
        with self._lock:
            self._readers[tenant] = self._readers.get(tenant, 0) + 1
        try:
            con = self._cursor(tenant)
            try:
                yield con
            finally:
                con.close()
        finally:
            with self._lock:
                self._readers[tenant] -= 1

    @contextmanager
    def _read_only(self, tenant: str) -> Iterator[duckdb.DuckDBPyConnection]:
        path = self.path(tenant)
        if not path.exists():
            msg = f"no data for tenant {tenant!r} ({path} does not exist)"
            raise SinkError(msg)
        try:
            con = duckdb.connect(str(path), read_only=True)
        except duckdb.Error as exc:
            if _is_lock_error(exc):
                msg = (
                    f"tenant {tenant!r} (partition {self.partition_of(tenant)}) is owned by another "
                    "worker, which holds its file; query that worker's API or retry"
                )
                raise StoreBusyError(msg) from None
            msg = f"cannot open {path}: {exc}"
            raise SinkError(msg) from exc
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
            for tenant, con in self._conns.items():
                self._close_connection(tenant, con)
            self._conns.clear()
            if self._owns_files:
                self.files.close()


class SpanStoreSink(BatchingSink[pa.Table]):
    """Batched Arrow appends of spans into each tenant's DuckDB file."""

    step_id = "duckdb"

    def __init__(self, store: TenantStore, *, max_rows: int, hooks: StageHooks) -> None:
        super().__init__(max_items=max_rows, hooks=hooks)
        self.store = store
        #: Spans stored for the first time / replaced by a newer version, since start.
        self.stored = 0
        self.updated = 0

    #: What :meth:`flush_aligned` writes whole; DuckDB's row group (tests use smaller ones).
    row_group_rows: int = ROW_GROUP_ROWS

    #: Set by :func:`betrace.resilience.wiring.guard_sinks`: the ``duckdb`` breaker around
    #: every store write, and the spool that takes the writes the store cannot make.
    breaker: Breaker | None = None
    writer: SpooledWriter[pa.Table] | None = None

    async def write(self, batch: list[pa.Table]) -> None:
        if self.writer is not None:
            await self.writer.write(batch)
        else:
            await self.write_now(batch)

    async def write_now(self, batch: list[pa.Table]) -> None:
        """Write straight to DuckDB (through the breaker when set); raise on failure."""
        if self.breaker is not None:
            inserted, updated = await self.breaker.call_async(self.store.run, self._write_sync, batch)
        else:
            inserted, updated = await self.store.run(self._write_sync, batch)
        self.stored += inserted
        self.updated += updated

    async def flush_aligned(self) -> dict[str, int]:
        """Write each tenant's whole row groups and keep the rest buffered; the rows written,
        per tenant. A tenant with less than one group buffered is written whole: its
        transaction ends in a partial group either way, and holding it back could delay
        it without bound behind a busy tenant that keeps the sink full.

        What stays (under one group per tenant) goes first in the next flush and keeps
        its age, so the interval flush writes it in time. A failed write drops it too,
        as :meth:`flush` drops its batch; Kafka replays both.
        """
        async with self._flush_lock:
            if not self._batch:
                return {}
            parts = split_by_tenant(pa.concat_tables(self._batch))
            group = self.row_group_rows
            whole = {t: p.num_rows if p.num_rows < group else p.num_rows // group * group for t, p in parts}
            rows = sum(whole.values())
            head = [part.slice(0, whole[tenant]) for tenant, part in parts]
            rest = [part.slice(whole[tenant]) for tenant, part in parts if part.num_rows > whole[tenant]]
            self._batch, self._size = rest, self._size - rows
            if not rest:
                self._first_added = None
            try:
                await self._write_counted(head, rows)
            except BaseException:
                self._batch, self._size, self._first_added = [], 0, None
                raise
            return whole

    def _write_sync(self, batch: list[pa.Table]) -> tuple[int, int]:
        table = pa.concat_tables(batch)
        # One chunk per tenant: DuckDB inserts the chunks of a multi-chunk table in
        # parallel, and each thread leaves a partial row group behind.
        results = [self.store.upsert_spans(t, part.combine_chunks()) for t, part in split_by_tenant(table)]
        return sum(r.inserted for r in results), sum(r.updated for r in results)
