"""Reading the audit trail, and the one place that builds a recorder from the settings.

There is no update or delete here, nor anywhere in the API or the CLI: the
trail is append-only (the only UPDATE in the package is the one-off
``parent_event_date`` backfill of legacy rows, :mod:`betrace.audit.backfill`).

Every read opens ``audit.duckdb`` read-only for the one query and closes it,
waiting out a writer's short hold (:func:`~betrace.sinks.shared_file.open_shared`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from betrace.audit.events import ClosableAuditRecorder, NullAuditRecorder
from betrace.audit.recorder import DuckDBAuditRecorder
from betrace.audit.schema import (
    BY_ID_SQL,
    CHILDREN_SQL,
    FILE_NAME,
    SELECT_COLUMNS,
    file_lock,
    one,
    row_to_dict,
    table_exists,
)
from betrace.config import Settings
from betrace.errors import SinkError
from betrace.metrics import StageHooks
from betrace.sinks.shared_file import open_shared

logger = logging.getLogger(__name__)

#: IN lists longer than this are split: DuckDB scans the index only for short lists.
_IN_CHUNK = 500


def audit_path(settings: Settings) -> Path:
    return settings.data_dir / FILE_NAME


def recorder_for(settings: Settings, hooks: StageHooks | None = None) -> ClosableAuditRecorder:
    """The recorder every component of a process shares; close it at the end of the process."""
    cfg = settings.audit
    if not cfg.enabled:
        return NullAuditRecorder()
    return DuckDBAuditRecorder(
        audit_path(settings),
        flush_events=cfg.flush_events,
        flush_interval_s=cfg.flush_interval_s,
        max_buffered=cfg.max_buffered,
        lock_timeout_s=cfg.lock_timeout_s,
        hooks=hooks,
    )


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Filters of an event list; ``since``/``until`` are ns (``until`` exclusive) on ``occurred_at``."""

    event_types: tuple[str, ...] = ()
    tenant: str | None = None
    actor: str | None = None
    subject: str | None = None
    outcome: str | None = None
    since: int | None = None
    until: int | None = None
    #: Only events of no tenant (system events); exclusive with ``tenant``.
    system_only: bool = False

    def as_dict(self) -> dict[str, object]:
        return {
            "type": list(self.event_types),
            "tenant": self.tenant,
            "actor": self.actor,
            "subject": self.subject,
            "outcome": self.outcome,
            "since": self.since,
            "until": self.until,
            "system": self.system_only,
        }

    def where(self) -> tuple[list[str], list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        if self.event_types:
            clauses.append(f"event_type IN ({', '.join('?' for _ in self.event_types)})")
            params.extend(self.event_types)
        if self.system_only:
            clauses.append("tenant IS NULL")
        elif self.tenant is not None:
            clauses.append("tenant = ?")
            params.append(self.tenant)
        for name in ("actor", "subject", "outcome"):
            value = getattr(self, name)
            if value is not None:
                clauses.append(f"{name} = ?")
                params.append(value)
        if self.since is not None:
            clauses.append("occurred_at >= ?")
            params.append(self.since)
        if self.until is not None:
            clauses.append("occurred_at < ?")
            params.append(self.until)
        return clauses, params


@dataclass(frozen=True, slots=True)
class EventPage:
    items: list[dict[str, Any]]
    #: ``(recorded_at, event_id)`` of the last item when more may follow, else None.
    next_key: tuple[int, str] | None


@dataclass(slots=True)
class Chain:
    event: dict[str, Any]
    #: Nearest first, up to the root (or the depth bound).
    ancestors: list[dict[str, Any]] = field(default_factory=list)
    #: Breadth first, ordered by ``(recorded_at, event_id)`` within a level; each has ``depth``.
    descendants: list[dict[str, Any]] = field(default_factory=list)
    truncated: bool = False


class AuditStore:
    """Read-only queries over ``audit.duckdb`` (lists, one event, children, chains)."""

    def __init__(self, path: Path, *, lock_timeout_s: float = 10.0) -> None:
        self.path = path
        self.lock_timeout_s = lock_timeout_s

    @classmethod
    def from_settings(cls, settings: Settings) -> AuditStore:
        return cls(audit_path(settings), lock_timeout_s=settings.audit.lock_timeout_s)

    @contextmanager
    def _read(self) -> Iterator[duckdb.DuckDBPyConnection | None]:
        """A read-only connection, or None while there is no trail yet."""
        if not self.path.exists():
            yield None
            return
        with (
            file_lock(self.path),
            open_shared(self.path, read_only=True, timeout_s=self.lock_timeout_s) as con,
        ):
            try:
                yield con if table_exists(con) else None
            except duckdb.Error as exc:
                msg = f"reading the audit trail {self.path} failed: {exc}"
                raise SinkError(msg) from exc

    # -- queries ------------------------------------------------------------------------

    def get(self, event_id: str) -> dict[str, Any] | None:
        with self._read() as con:
            if con is None:
                return None
            row = one(con, BY_ID_SQL, [event_id])
        return row_to_dict(row) if row else None

    def list_events(self, flt: EventFilter, *, limit: int, after: tuple[int, str] | None = None) -> EventPage:
        """Events in ``(recorded_at, event_id)`` order after the cursor key ``after``.

        ``recorded_at`` only grows in commit order, so an event written while
        a client pages always sorts after every key already handed out.
        """
        clauses, params = flt.where()
        if after is not None:
            # The first clause lets DuckDB skip row groups by their recorded_at range.
            clauses.append("recorded_at >= ? AND (recorded_at > ? OR event_id > ?)")
            params.extend([after[0], after[0], after[1]])
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        sql = (
            f"SELECT {SELECT_COLUMNS} FROM audit_events {where} "  # noqa: S608 - clauses are fixed text
            "ORDER BY recorded_at, event_id LIMIT ?"
        )
        with self._read() as con:
            if con is None:
                return EventPage([], None)
            rows = con.execute(sql, [*params, limit + 1]).fetchall()
        items = [row_to_dict(r) for r in rows[:limit]]
        more = len(rows) > limit
        last = items[-1] if items and more else None
        return EventPage(items, (last["recorded_at"], last["event_id"]) if last else None)

    def children(
        self,
        event_id: str,
        *,
        limit: int,
        after: tuple[int, str] | None = None,
        tenant: str | None = None,
    ) -> EventPage:
        """Direct children in ``(recorded_at, event_id)`` order, found through the parent index."""
        with self._read() as con:
            if con is None:
                return EventPage([], None)
            rows = con.execute(CHILDREN_SQL, [event_id]).fetchall()
        items = sorted((row_to_dict(r) for r in rows), key=lambda d: (d["recorded_at"], d["event_id"]))
        if tenant is not None:
            items = [d for d in items if d["tenant"] == tenant]
        if after is not None:
            items = [d for d in items if (d["recorded_at"], d["event_id"]) > after]
        page = items[:limit]
        more = len(items) > limit
        return EventPage(page, (page[-1]["recorded_at"], page[-1]["event_id"]) if more and page else None)

    def chain(self, event_id: str, *, max_depth: int = 32, max_events: int = 1000) -> Chain | None:
        """The event, its ancestors and its descendants, ``max_depth`` levels each way at most.

        Walked one level per query through the two indexes; DuckDB runs the
        join of a recursive CTE as a hash join over the whole table on every
        iteration (about 2 s per chain on 10 million events), so the walk is
        done here, with the same result and bounds.
        """
        with self._read() as con:
            if con is None:
                return None
            row = one(con, BY_ID_SQL, [event_id])
            if row is None:
                return None
            chain = Chain(row_to_dict(row))
            seen = {chain.event["event_id"]}
            self._ancestors(con, chain, seen, max_depth)
            self._descendants(con, chain, seen, max_depth, max_events)
        return chain

    @staticmethod
    def _ancestors(con: duckdb.DuckDBPyConnection, chain: Chain, seen: set[str], max_depth: int) -> None:
        parent_id = chain.event["parent_event_id"]
        for _ in range(max_depth):
            if parent_id is None or parent_id in seen:
                return
            row = one(con, BY_ID_SQL, [parent_id])
            if row is None:
                return
            doc = row_to_dict(row)
            chain.ancestors.append(doc)
            seen.add(parent_id)
            parent_id = doc["parent_event_id"]
        chain.truncated = chain.truncated or parent_id is not None

    @staticmethod
    def _descendants(
        con: duckdb.DuckDBPyConnection, chain: Chain, seen: set[str], max_depth: int, max_events: int
    ) -> None:
        frontier = [chain.event["event_id"]]
        for depth in range(1, max_depth + 1):
            if not frontier:
                return
            level: list[dict[str, Any]] = []
            for i in range(0, len(frontier), _IN_CHUNK):
                chunk = frontier[i : i + _IN_CHUNK]
                marks = ", ".join("?" for _ in chunk)
                sql = f"SELECT {SELECT_COLUMNS} FROM audit_events WHERE parent_event_id IN ({marks})"  # noqa: S608
                level.extend(row_to_dict(r) for r in con.execute(sql, chunk).fetchall())
            level = [d for d in level if d["event_id"] not in seen]
            level.sort(key=lambda d: (d["recorded_at"], d["event_id"]))
            room = max_events - len(chain.descendants)
            if len(level) > room:
                level, chain.truncated = level[:room], True
            for doc in level:
                doc["depth"] = depth
                seen.add(doc["event_id"])
            chain.descendants.extend(level)
            if chain.truncated:
                return
            frontier = [d["event_id"] for d in level]
        chain.truncated = chain.truncated or bool(frontier)

    def count(self) -> int:
        with self._read() as con:
            if con is None:
                return 0
            row = one(con, "SELECT count(*) FROM audit_events")
        return int(row[0]) if row else 0
