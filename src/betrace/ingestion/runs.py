"""Ingestion runs: one row per worker session, ``betrace produce`` and ``betrace import``.

The rows live in ``<data_dir>/runs.duckdb``, which workers and CLI commands
write; it is opened only for one unit of work at a time
(:func:`~betrace.sinks.shared_file.open_shared`). A worker updates its row
every ``integrity.run_checkpoint_s`` and at stop; a row still ``running``
whose ``updated_at`` is older than a few checkpoints belonged to a process that
died (shown as ``stale``).

What the counters mean depends on who saw the data (see docs/ingestion.md):

* ``messages``/``spans``: records and spans this run read (a worker: consumed
  from the input topic; produce/import: sent to it).
* ``duplicates``: spans the ingest stage dropped as exact replays.
* ``dead_lettered``: records the ingest stage sent to the dead-letter topic.
* ``stored``/``updated``: spans the span store sink of this worker stored for
  the first time / replaced by a newer version. Only the process running the
  span store sees them; produce/import runs leave them ``NULL``.
* ``failures``, ``failure_reasons`` (reason → count), ``failure_samples``
  (where, newest last): records or lines that could not be used.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import orjson

from betrace.audit import AuditEventType, AuditRecorder, EventRef, NullAuditRecorder
from betrace.errors import SinkError
from betrace.ingestion.audit import recorder_for
from betrace.sinks.shared_file import open_shared

if TYPE_CHECKING:
    from betrace.config import Settings

logger = logging.getLogger(__name__)

RUNS_FILE = "runs.duckdb"
KINDS = ("worker", "produce", "import")
STATES = ("running", "finished", "failed", "interrupted")
#: What a reader may filter on: the stored states plus the derived ``stale``.
RUN_STATES = ("running", "stale", "finished", "failed", "interrupted")
#: A running row not updated for this many checkpoint intervals is reported as stale.
STALE_CHECKPOINTS = 4

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS ingestion_runs (
    run_id VARCHAR PRIMARY KEY,
    kind VARCHAR NOT NULL,
    source VARCHAR NOT NULL,
    host VARCHAR NOT NULL,
    pid INTEGER NOT NULL,
    state VARCHAR NOT NULL,
    started_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    finished_at TIMESTAMPTZ,
    messages BIGINT NOT NULL DEFAULT 0,
    spans BIGINT NOT NULL DEFAULT 0,
    duplicates BIGINT,
    dead_lettered BIGINT,
    stored BIGINT,
    updated BIGINT,
    failures BIGINT NOT NULL DEFAULT 0,
    failure_reasons JSON NOT NULL DEFAULT '{}',
    failure_samples JSON NOT NULL DEFAULT '[]',
    checkpoints INTEGER NOT NULL DEFAULT 0,
    checkpoint_s DOUBLE NOT NULL,
    started_ns BIGINT NOT NULL,
    note VARCHAR
);
"""

COLUMNS = (
    "run_id",
    "kind",
    "source",
    "host",
    "pid",
    "state",
    "started_at",
    "updated_at",
    "finished_at",
    "messages",
    "spans",
    "duplicates",
    "dead_lettered",
    "stored",
    "updated",
    "failures",
    "failure_reasons",
    "failure_samples",
    "checkpoints",
    "checkpoint_s",
    "started_ns",
    "note",
)


@dataclass(slots=True)
class RunCounts:
    """A run's counters; ``None`` means "not seen by this process", not zero."""

    messages: int = 0
    spans: int = 0
    duplicates: int | None = None
    dead_lettered: int | None = None
    stored: int | None = None
    updated: int | None = None
    failure_reasons: dict[str, int] = field(default_factory=dict)
    failure_samples: list[str] = field(default_factory=list)

    @property
    def failures(self) -> int:
        return sum(self.failure_reasons.values())

    def fail(self, reason: str, where: str, *, max_samples: int = 20) -> None:
        self.failure_reasons[reason] = self.failure_reasons.get(reason, 0) + 1
        self.failure_samples.append(f"{where}: {reason}")
        del self.failure_samples[:-max_samples]

    def as_payload(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "spans": self.spans,
            "duplicates": self.duplicates,
            "dead_lettered": self.dead_lettered,
            "stored": self.stored,
            "updated": self.updated,
            "failures": self.failures,
            "failure_reasons": dict(self.failure_reasons),
        }

    def delta(self, before: dict[str, Any]) -> dict[str, int]:
        """What grew since ``before`` (an earlier :meth:`as_payload`): a batch's share."""
        now = self.as_payload()
        out = {}
        for name in ("messages", "spans", "duplicates", "dead_lettered", "stored", "updated", "failures"):
            grown = (now[name] or 0) - (before.get(name) or 0)
            if grown:
                out[name] = grown
        return out


def runs_path(data_dir: Path) -> Path:
    return data_dir / RUNS_FILE


def new_run_id(kind: str) -> str:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{kind}-{stamp}-{uuid.uuid4().hex[:8]}"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class RunStore:
    """Rows of ``runs.duckdb``; every call opens and closes the file."""

    def __init__(self, data_dir: Path, *, timeout_s: float = 10.0) -> None:
        self.path = runs_path(data_dir)
        self.timeout_s = timeout_s

    def _write(self, sql: str, params: list[Any]) -> None:
        try:
            with open_shared(self.path, timeout_s=self.timeout_s) as con:
                con.execute(SCHEMA_SQL)
                con.execute(sql, params)
        except duckdb.Error as exc:
            msg = f"{self.path}: writing an ingestion run failed: {exc}"
            raise SinkError(msg) from exc

    def start(
        self, run_id: str, kind: str, source: str, *, checkpoint_s: float, note: str | None = None
    ) -> None:
        now = _now()
        self._write(
            "INSERT INTO ingestion_runs (run_id, kind, source, host, pid, state, started_at, updated_at, "
            "checkpoint_s, started_ns, note) VALUES (?, ?, ?, ?, ?, 'running', ?, ?, ?, ?, ?)",
            [
                run_id,
                kind,
                source,
                socket.gethostname(),
                os.getpid(),
                now,
                now,
                checkpoint_s,
                int(now.timestamp() * 1e9),
                note,
            ],
        )

    def save(self, run_id: str, counts: RunCounts, *, state: str = "running") -> None:
        """Overwrite the counters (they are totals, so a repeated save is harmless)."""
        now = _now()
        self._write(
            "UPDATE ingestion_runs SET state = ?, updated_at = ?, "
            "finished_at = CASE WHEN ? = 'running' THEN NULL ELSE ? END, messages = ?, spans = ?, "
            "duplicates = ?, dead_lettered = ?, stored = ?, updated = ?, failures = ?, "
            "failure_reasons = ?, failure_samples = ?, checkpoints = checkpoints + 1 WHERE run_id = ?",
            [
                state,
                now,
                state,
                now,
                counts.messages,
                counts.spans,
                counts.duplicates,
                counts.dead_lettered,
                counts.stored,
                counts.updated,
                counts.failures,
                orjson.dumps(counts.failure_reasons).decode(),
                orjson.dumps(counts.failure_samples).decode(),
                run_id,
            ],
        )

    def _read(self, sql: str, params: list[Any]) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        try:
            with open_shared(self.path, read_only=True, timeout_s=self.timeout_s) as con:
                exists = con.execute(
                    "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'ingestion_runs'"
                ).fetchall()
                if exists != [(1,)]:
                    return []
                cur = con.execute(sql, params)
                names = [d[0] for d in cur.description or ()]
                rows = cur.fetchall()
        except duckdb.Error as exc:
            msg = f"{self.path}: reading ingestion runs failed: {exc}"
            raise SinkError(msg) from exc
        return [_row(dict(zip(names, row, strict=True))) for row in rows]

    def get(self, run_id: str) -> dict[str, Any] | None:
        cols = ", ".join(COLUMNS)
        rows = self._read(f"SELECT {cols} FROM ingestion_runs WHERE run_id = ?", [run_id])  # noqa: S608 - fixed
        return rows[0] if rows else None

    def list(
        self,
        *,
        kind: str | None = None,
        state: str | None = None,
        limit: int = 100,
        after: tuple[int, str] | None = None,
    ) -> list[dict[str, Any]]:
        """Newest first; ``after`` is the ``(started_ns, run_id)`` of the previous page's last row."""
        where: list[str] = ["TRUE"]
        params: list[Any] = []
        if kind:
            where.append("kind = ?")
            params.append(kind)
        if state:
            # 'stale' is derived: a running row whose process stopped checkpointing.
            if state == "stale":
                where.append("state = 'running' AND updated_at < now() - to_seconds(checkpoint_s * ?)")
                params.append(STALE_CHECKPOINTS)
            elif state == "running":
                where.append("state = 'running' AND updated_at >= now() - to_seconds(checkpoint_s * ?)")
                params.append(STALE_CHECKPOINTS)
            else:
                where.append("state = ?")
                params.append(state)
        if after is not None:
            where.append("(started_ns, run_id) < (?, ?)")
            params += [after[0], after[1]]
        cols = ", ".join(COLUMNS)
        sql = (
            f"SELECT {cols} FROM ingestion_runs WHERE {' AND '.join(where)} "  # noqa: S608 - fixed parts
            "ORDER BY started_ns DESC, run_id DESC LIMIT ?"
        )
        return self._read(sql, [*params, limit])


def _row(row: dict[str, Any]) -> dict[str, Any]:
    """JSON-ready: timestamps as RFC 3339, JSON columns parsed, stale runs marked."""
    for name in ("failure_reasons", "failure_samples"):
        if isinstance(row.get(name), str):
            row[name] = orjson.loads(row[name])
    if row.get("state") == "running" and isinstance(row.get("updated_at"), dt.datetime):
        silent = (_now() - row["updated_at"]).total_seconds()
        if silent > STALE_CHECKPOINTS * float(row.get("checkpoint_s") or 5.0):
            row["state"] = "stale"
    for name in ("started_at", "updated_at", "finished_at"):
        value = row.get(name)
        if isinstance(value, dt.datetime):
            row[name] = value.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return row


class IngestionRun:
    """One run's life: a row in ``runs.duckdb`` and its audit events (started → batches → finished).

    Recording never stops ingestion: a failed write of the row or an audit
    event is logged and retried at the next checkpoint.
    """

    def __init__(
        self,
        data_dir: Path,
        kind: str,
        source: str,
        *,
        checkpoint_s: float = 5.0,
        audit: AuditRecorder | None = None,
        actor: str = "betrace",
        note: str | None = None,
        parent: EventRef | None = None,
    ) -> None:
        if kind not in KINDS:
            msg = f"unknown run kind {kind!r}; expected one of {', '.join(KINDS)}"
            raise ValueError(msg)
        self.store = RunStore(data_dir)
        self.run_id = new_run_id(kind)
        self.kind = kind
        self.source = source
        self.checkpoint_s = checkpoint_s
        self.audit = audit or NullAuditRecorder()
        self.actor = actor
        self.note = note
        self.parent = parent if isinstance(parent, EventRef) else None
        self.counts = RunCounts()
        self.started: EventRef | None = None
        self._last: dict[str, Any] = {}
        self._batches = 0
        self._saved = False
        # A worker cancelled mid-checkpoint finishes while the executor thread still saves;
        # two in-process writers of one row make DuckDB refuse both ("Conflict on update").
        self._lock = threading.Lock()

    def start(self) -> None:
        try:
            self.store.start(
                self.run_id, self.kind, self.source, checkpoint_s=self.checkpoint_s, note=self.note
            )
            self._saved = True
        except SinkError as exc:
            logger.warning("ingestion run %s: cannot record its start: %s", self.run_id, exc)
        self.started = self._audit(
            AuditEventType.INGESTION_RUN_STARTED,
            {"run_id": self.run_id, "kind": self.kind, "source": self.source},
            parent=self.parent,
        )
        logger.info("ingestion run %s (%s) started: %s", self.run_id, self.kind, self.source)

    def checkpoint(self) -> None:
        """Save the counters; record the growth since the last checkpoint as one batch event."""
        with self._lock:
            self._checkpoint()

    def _checkpoint(self) -> None:
        grown = self.counts.delta(self._last)
        if not grown and self._batches:
            return
        self._save("running")
        if grown:
            self._batches += 1
            self._audit(
                AuditEventType.INGESTION_BATCH,
                {"run_id": self.run_id, "batch": self._batches, **grown},
                parent=self.started,
            )
        self._last = self.counts.as_payload()

    def finish(self, state: str = "finished", *, error: str | None = None) -> None:
        with self._lock:
            if error:
                self.counts.fail("run_failed", error[:300])
            self._checkpoint()
            self._save(state)
        outcome = "ok" if state == "finished" and not self.counts.failures else state
        if state == "finished" and self.counts.failures:
            outcome = "partial"
        self._audit(
            AuditEventType.INGESTION_RUN_FINISHED,
            {"run_id": self.run_id, "state": state, **self.counts.as_payload()},
            parent=self.started,
            outcome=outcome,
        )
        logger.info(
            "ingestion run %s %s: %d messages, %d spans, %d failures",
            self.run_id,
            state,
            self.counts.messages,
            self.counts.spans,
            self.counts.failures,
        )

    def _save(self, state: str) -> None:
        try:
            if not self._saved:
                self.store.start(
                    self.run_id, self.kind, self.source, checkpoint_s=self.checkpoint_s, note=self.note
                )
                self._saved = True
            self.store.save(self.run_id, self.counts, state=state)
        except SinkError as exc:
            logger.warning(
                "ingestion run %s: cannot save its counters (retrying later): %s", self.run_id, exc
            )

    def _audit(
        self, event: AuditEventType, payload: dict[str, Any], *, parent: EventRef | None, outcome: str = "ok"
    ) -> EventRef | None:
        try:
            return self.audit.record(
                event,
                actor=self.actor,
                subject=f"ingestion_run:{self.run_id}",
                outcome=outcome,
                payload=payload,
                parent=parent,
            )
        except Exception:
            logger.warning("ingestion run %s: audit event %s not recorded", self.run_id, event, exc_info=True)
            return None


@contextmanager
def recorded_run(settings: Settings, kind: str, source: str, *, actor: str) -> Iterator[IngestionRun]:
    """A CLI command as one ingestion run: finished, failed or interrupted as the block ends."""

    recorder = recorder_for(settings)
    run = IngestionRun(
        settings.data_dir,
        kind,
        source,
        checkpoint_s=settings.integrity.run_checkpoint_s,
        audit=recorder,
        actor=actor,
    )
    run.start()
    try:
        yield run
    except KeyboardInterrupt:
        run.finish("interrupted")
        raise
    except BaseException as exc:
        run.finish("failed", error=str(exc) or type(exc).__name__)
        raise
    else:
        run.finish("finished")
    finally:
        close_recorder(recorder)


def close_recorder(recorder: AuditRecorder) -> None:
    """Flush a buffering recorder a command owns (the DuckDB store buffers events)."""
    close = getattr(recorder, "close", None)
    if callable(close):
        try:
            close()
        except Exception:  # the run row is written; the trail is best effort here
            logger.warning("closing the audit recorder failed", exc_info=True)
