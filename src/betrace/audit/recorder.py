"""The DuckDB audit recorder: buffer events, write them in batches, parents first.

``record`` only appends to an in-memory buffer and returns the event's
reference; a background thread writes the buffer every ``flush_interval_s``
or as soon as ``flush_events`` are waiting, and ``close`` writes the rest.
Each write opens ``audit.duckdb`` with :func:`~betrace.sinks.shared_file.open_shared`
(workers and CLI commands share the file, so nobody holds it), attached to the
process's shared instance, inserts in one transaction and detaches it.

Ordering and the foreign key: events are written in the order they were
recorded; inside one batch, DuckDB checks the foreign key only against rows
of earlier statements, so a batch is inserted level by level (events whose
parent is in the same batch go in a later statement). A parent that is in
neither the batch nor the table (it was never written: the process that
recorded it was killed before its flush) would make the whole batch fail;
such a child is written without the link instead, the lost parent kept in
its payload as ``detached_parent``, counted and logged.

``recorded_at`` is assigned inside the write transaction as
``max(now, max(recorded_at) + 1)`` plus the row's position, while the file
is held exclusively: it is strictly increasing in commit order across every
process, which is what keeps keyset pagination from missing rows.

The buffer is bounded (``max_buffered``): when the file stays unwritable
that long, further events are dropped, counted and logged, rather than
blocking the pipeline or growing without limit.
"""

from __future__ import annotations

import atexit
import datetime as dt
import logging
import threading
import time
import weakref
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow as pa

from betrace.audit.events import EVENT_ID_RE, AuditEventType, EventRef
from betrace.audit.schema import COLUMNS, ensure_schema, file_lock, one
from betrace.errors import BetraceError, SinkError
from betrace.metrics import InMemoryHooks, StageHooks
from betrace.sinks.shared_file import SHARED_INSTANCE, open_shared

logger = logging.getLogger(__name__)

STEP_ID = "audit"
_ARROW_SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("event_date", pa.date32()),
        ("parent_event_id", pa.string()),
        ("parent_event_date", pa.date32()),
        ("event_type", pa.string()),
        ("actor", pa.string()),
        ("tenant", pa.string()),
        ("subject", pa.string()),
        ("outcome", pa.string()),
        ("payload", pa.string()),
        ("occurred_at", pa.int64()),
        ("recorded_at", pa.int64()),
    ]
)
#: A plain INSERT: duplicates are filtered beforehand (see ``_levels``).
_INSERT_SQL = (
    f"INSERT INTO audit_events ({', '.join(COLUMNS)}) "  # noqa: S608 - fixed column list
    f"SELECT {', '.join(c if c != 'payload' else 'CAST(payload AS JSON)' for c in COLUMNS)} "
    "FROM _audit_batch"
)
#: Ids per IN list: short enough for DuckDB to answer with index lookups.
_LOOKUP_CHUNK = 500


#: Recorders not closed yet: written at interpreter exit, so that a command that forgot
#: ``close()`` still leaves its events (the flush thread is a daemon and would just stop).
_OPEN: weakref.WeakSet[DuckDBAuditRecorder] = weakref.WeakSet()


@atexit.register
def _close_all_at_exit() -> None:
    for recorder in list(_OPEN):
        recorder.close()


def _text(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - 1] + "…"


@dataclass(slots=True)
class _Event:
    event_id: str
    event_date: dt.date
    parent: EventRef | None
    event_type: str
    actor: str
    tenant: str | None
    subject: str
    outcome: str
    payload: dict[str, Any]
    occurred_ns: int


class DuckDBAuditRecorder:
    """An :class:`~betrace.audit.events.ClosableAuditRecorder` over ``audit.duckdb``."""

    step_id = STEP_ID

    def __init__(
        self,
        path: Path,
        *,
        flush_events: int = 500,
        flush_interval_s: float = 1.0,
        max_buffered: int = 100_000,
        lock_timeout_s: float = 10.0,
        hooks: StageHooks | None = None,
    ) -> None:
        self.path = path
        self.flush_events = flush_events
        self.flush_interval_s = flush_interval_s
        self.max_buffered = max_buffered
        self.lock_timeout_s = lock_timeout_s
        self.hooks = hooks or InMemoryHooks()
        self._buffer: list[_Event] = []
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._schema_ready = False
        self._dropped = 0
        self.written = 0
        _OPEN.add(self)

    # -- AuditRecorder -------------------------------------------------------------------

    def record(
        self,
        event_type: AuditEventType,
        *,
        actor: str,
        subject: str,
        outcome: str = "ok",
        tenant: str | None = None,
        payload: dict[str, Any] | None = None,
        parent: EventRef | None = None,
        event_id: str | None = None,
        at: dt.datetime | None = None,
    ) -> EventRef:
        when = (at or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
        if event_id is None or not EVENT_ID_RE.match(event_id):
            if event_id is not None:
                logger.warning("audit: invalid event id %r replaced by a random one", event_id[:80])
            ref = EventRef.new(when)
        else:
            ref = EventRef(event_id, when.date())
        event = _Event(
            ref.event_id,
            ref.event_date,
            parent,
            str(event_type),
            _text(actor, 200),
            tenant,
            _text(subject, 500),
            _text(outcome, 100),
            dict(payload or {}),
            int(when.timestamp() * 1_000_000) * 1000,
        )
        with self._lock:
            if len(self._buffer) >= self.max_buffered:
                self._dropped += 1
                dropped = self._dropped
            else:
                self._buffer.append(event)
                dropped = 0
                size = len(self._buffer)
        if dropped:
            self.hooks.count("betrace_audit_dropped_total", reason="buffer_full")
            if dropped == 1 or dropped % 1000 == 0:
                logger.error(
                    "audit: buffer full (%d events, %s unwritable); %d event(s) dropped so far",
                    self.max_buffered,
                    self.path,
                    dropped,
                )
            return ref
        self._ensure_thread()
        if size >= self.flush_events:
            self._wake.set()
        return ref

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        with self._lock:
            return len(self._buffer)

    def _ensure_thread(self) -> None:
        if self._thread is not None or self._closed:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="betrace-audit-flush", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_interval_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.flush()
            except BetraceError as exc:  # retried at the next tick; the buffer keeps the events
                logger.warning("audit: write to %s failed, will retry: %s", self.path, exc)
            except Exception:  # a bug must not end the thread: the events stay buffered
                logger.exception("audit: unexpected failure writing %s; will retry", self.path)

    def close(self) -> None:
        """Stop the flush thread and write everything still buffered."""
        self._closed = True
        _OPEN.discard(self)
        self._stop.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        try:
            self.flush()
        except BetraceError as exc:
            logger.error("audit: %d event(s) could not be written at close: %s", self.buffered, exc)  # noqa: TRY400

    def __enter__(self) -> DuckDBAuditRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing ------------------------------------------------------------------------

    def flush(self) -> int:
        """Write everything buffered (in batches); return the number of new rows."""
        total = 0
        with self._flush_lock:
            while True:
                with self._lock:
                    batch = self._buffer[: max(self.flush_events, 1) * 4]
                if not batch:
                    break
                total += self._write(batch)
                with self._lock:
                    del self._buffer[: len(batch)]
            self.hooks.gauge("betrace_audit_buffered", self.buffered)
        return total

    def _write(self, batch: list[_Event]) -> int:
        try:
            return self._write_batch(batch)
        except duckdb.Error as exc:
            msg = f"writing the audit trail {self.path} failed: {exc}"
            raise SinkError(msg) from exc

    def _write_batch(self, batch: list[_Event]) -> int:
        started = time.perf_counter()
        with (
            file_lock(self.path),
            open_shared(self.path, timeout_s=self.lock_timeout_s, via=SHARED_INSTANCE) as con,
        ):
            if not self._schema_ready:
                ensure_schema(con)
                self._schema_ready = True
            levels = self._levels(con, batch)
            con.execute("BEGIN")
            try:
                written = self._insert_levels(con, levels)
            except duckdb.Error as exc:
                con.execute("ROLLBACK")
                logger.error("audit: batch of %d rejected (%s); writing it row by row", len(batch), exc)  # noqa: TRY400
                written = self._insert_one_by_one(con, levels)
            else:
                con.execute("COMMIT")
        self.hooks.observe("betrace_audit_flush_seconds", time.perf_counter() - started)
        for event_type, n in written.items():
            self.hooks.count("betrace_audit_events_total", n, type=event_type)
        count = sum(written.values())
        self.written += count
        return count

    @staticmethod
    def _existing(con: duckdb.DuckDBPyConnection, ids: list[str]) -> dict[str, dt.date]:
        """Dates of the events among ``ids`` already in the table (unique-index lookups)."""
        found: dict[str, dt.date] = {}
        for i in range(0, len(ids), _LOOKUP_CHUNK):
            chunk = ids[i : i + _LOOKUP_CHUNK]
            marks = ", ".join("?" for _ in chunk)
            rows = con.execute(
                f"SELECT event_id, event_date FROM audit_events WHERE event_id IN ({marks})",  # noqa: S608
                chunk,
            ).fetchall()
            found.update((r[0], r[1]) for r in rows)
        return found

    def _levels(self, con: duckdb.DuckDBPyConnection, batch: list[_Event]) -> list[list[_Event]]:
        """The new events of ``batch`` grouped by depth within it, parents' dates made canonical.

        Events whose id is already written (derived ids recorded again) are
        skipped here rather than with INSERT OR IGNORE, which DuckDB 2.0
        answers by checking the whole table (seconds at 10 million rows).
        A parent that exists in neither the batch nor the table is cut off.
        """
        unique: dict[str, _Event] = {}
        for event in batch:
            unique.setdefault(event.event_id, event)
        wanted = set(unique) | {e.parent.event_id for e in batch if e.parent is not None}
        existing = self._existing(con, sorted(wanted))
        dates = {**existing, **{i: e.event_date for i, e in unique.items() if i not in existing}}
        depth: dict[str, int] = {}
        levels: list[list[_Event]] = []
        for event in unique.values():  # recorded order: a parent always comes before its children
            if event.event_id in existing:
                continue
            level = 0
            parent = event.parent
            if parent is not None:
                if parent.event_id in dates:
                    # Ids are unique: the stored (or batch) date is the parent's date.
                    event.parent = EventRef(parent.event_id, dates[parent.event_id])
                    level = depth.get(parent.event_id, -1) + 1
                else:
                    logger.warning(
                        "audit: %s %s names parent %s that was never written; recorded without the link",
                        event.event_type,
                        event.event_id,
                        parent.event_id,
                    )
                    self.hooks.count("betrace_audit_dropped_total", reason="detached_parent")
                    event.payload = {**event.payload, "detached_parent": parent.to_dict()}
                    event.parent = None
            depth[event.event_id] = level
            while len(levels) <= level:
                levels.append([])
            levels[level].append(event)
        return levels

    @staticmethod
    def _clock(con: duckdb.DuckDBPyConnection) -> int:
        row = one(con, "SELECT max(recorded_at) FROM audit_events")
        last = int(row[0]) if row and row[0] is not None else 0
        return max(time.time_ns(), last + 1)

    def _insert_levels(self, con: duckdb.DuckDBPyConnection, levels: list[list[_Event]]) -> Counter[str]:
        base = self._clock(con)
        written: Counter[str] = Counter()
        for level in levels:
            table = self._arrow(level, base)
            base += len(level)
            con.register("_audit_batch", table)
            try:
                con.execute(_INSERT_SQL).fetchall()
            finally:
                con.unregister("_audit_batch")
            written.update(e.event_type for e in level)
        return written

    def _insert_one_by_one(self, con: duckdb.DuckDBPyConnection, levels: list[list[_Event]]) -> Counter[str]:
        """After a failed batch: keep every row that can be written, drop (and log) the rest."""
        written: Counter[str] = Counter()
        for level in levels:
            for event in level:
                try:
                    written += self._insert_levels(con, [[event]])
                except duckdb.Error as exc:
                    self.hooks.count("betrace_audit_dropped_total", reason="rejected")
                    logger.error("audit: dropped %s %s: %s", event.event_type, event.event_id, exc)  # noqa: TRY400
        return written

    @staticmethod
    def _arrow(events: list[_Event], base: int) -> pa.Table:
        return pa.Table.from_pydict(
            {
                "event_id": [e.event_id for e in events],
                "event_date": [e.event_date for e in events],
                "parent_event_id": [e.parent.event_id if e.parent else None for e in events],
                "parent_event_date": [e.parent.event_date if e.parent else None for e in events],
                "event_type": [e.event_type for e in events],
                "actor": [e.actor for e in events],
                "tenant": [e.tenant for e in events],
                "subject": [e.subject for e in events],
                "outcome": [e.outcome for e in events],
                "payload": [
                    orjson.dumps(e.payload, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
                    for e in events
                ],
                "occurred_at": [e.occurred_ns for e in events],
                "recorded_at": list(range(base, base + len(events))),
            },
            schema=_ARROW_SCHEMA,
        )
