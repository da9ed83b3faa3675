"""Backfill ``parent_event_date`` on legacy rows, in committed batches, resumable.

Legacy rows were written before the column existed: they name a parent by
id only, so the foreign key does not cover them. The backfill copies each
parent's ``event_date`` into its children, batch by batch; every batch is
its own short transaction on a short-lived open of the shared file, so
workers keep writing meanwhile, and an interrupted run loses at most the
batch in flight: a rerun simply continues with the rows still NULL.

Order matters in DuckDB: an UPDATE of a row that children reference (with a
date) is refused, as it is a delete plus an insert. So a row is filled only
once its parent is complete (a root, or already filled) and while nothing
references it with a date; parents go before children, level by level.
Rows that can never be filled are reported by :func:`validate`: parents
that do not exist (dangling references), rows already referenced by dated
children ("blocked"), and rows below either.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from betrace.audit.schema import ensure_schema, file_lock, one, table_exists
from betrace.sinks.shared_file import open_shared

logger = logging.getLogger(__name__)

LEGACY_WHERE = "parent_event_id IS NOT NULL AND parent_event_date IS NULL"
_ELIGIBLE_SQL = """
    SELECT c.event_id, p.event_date
    FROM audit_events c JOIN audit_events p ON p.event_id = c.parent_event_id
    WHERE c.parent_event_id IS NOT NULL AND c.parent_event_date IS NULL
      AND (p.parent_event_id IS NULL OR p.parent_event_date IS NOT NULL)
      AND NOT EXISTS (
          SELECT 1 FROM audit_events g
          WHERE g.parent_event_id = c.event_id AND g.parent_event_date IS NOT NULL)
    ORDER BY c.recorded_at, c.event_id
    LIMIT ?
"""
_UPDATE_SQL = """
    UPDATE audit_events SET parent_event_date = b.parent_date
    FROM _backfill b
    WHERE audit_events.event_id = b.event_id AND audit_events.parent_event_date IS NULL
"""
ProgressFn = Callable[[int, int], None]


@dataclass(slots=True)
class BackfillResult:
    filled: int = 0
    batches: int = 0
    seconds: float = 0.0


@dataclass(slots=True)
class Validation:
    rows: int = 0
    legacy_remaining: int = 0
    #: Legacy rows whose parent does not exist at all.
    dangling: int = 0
    #: Legacy rows that dated children already reference (DuckDB cannot update them in place).
    blocked: int = 0
    #: Dated references without their parent: the foreign key makes this 0.
    fk_violations: int = 0
    samples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.legacy_remaining == 0 and self.fk_violations == 0


def legacy_count(path: Path, *, timeout_s: float = 10.0) -> int:
    if not path.exists():
        return 0
    with file_lock(path), open_shared(path, read_only=True, timeout_s=timeout_s) as con:
        if not table_exists(con):
            return 0
        row = one(con, f"SELECT count(*) FROM audit_events WHERE {LEGACY_WHERE}")  # noqa: S608
    return int(row[0]) if row else 0


def backfill(
    path: Path,
    *,
    batch_size: int = 10_000,
    pause_s: float = 0.0,
    progress_every: int = 10_000,
    on_progress: ProgressFn | None = None,
    timeout_s: float = 10.0,
) -> BackfillResult:
    """Fill what can be filled; ``on_progress(filled_so_far, batch)`` after each commit."""
    result = BackfillResult()
    started = time.perf_counter()
    next_log = progress_every
    while True:
        with file_lock(path), open_shared(path, timeout_s=timeout_s) as con:
            ensure_schema(con)
            rows = con.execute(_ELIGIBLE_SQL, [batch_size]).fetchall()
            if not rows:
                break
            batch = pa.table(
                {"event_id": [r[0] for r in rows], "parent_date": [r[1] for r in rows]},
                schema=pa.schema([("event_id", pa.string()), ("parent_date", pa.date32())]),
            )
            con.execute("BEGIN")
            con.register("_backfill", batch)
            try:
                con.execute(_UPDATE_SQL).fetchall()
            except BaseException:
                con.execute("ROLLBACK")
                raise
            finally:
                con.unregister("_backfill")
            con.execute("COMMIT")
        result.filled += len(rows)
        result.batches += 1
        if on_progress is not None:
            on_progress(result.filled, len(rows))
        while result.filled >= next_log:
            logger.info("audit backfill: %d rows filled so far (%d batches)", result.filled, result.batches)
            next_log += progress_every
        if pause_s:
            time.sleep(pause_s)
    result.seconds = time.perf_counter() - started
    logger.info(
        "audit backfill: %d rows filled in %d batches, %.1f s", result.filled, result.batches, result.seconds
    )
    return result


def validate(path: Path, *, timeout_s: float = 10.0, samples: int = 10) -> Validation:
    """Check the parent references of the whole table after a backfill."""
    report = Validation()
    if not path.exists():
        return report
    with file_lock(path), open_shared(path, read_only=True, timeout_s=timeout_s) as con:
        if not table_exists(con):
            return report
        report.rows = int((one(con, "SELECT count(*) FROM audit_events") or (0,))[0])
        report.legacy_remaining = int(
            (one(con, f"SELECT count(*) FROM audit_events WHERE {LEGACY_WHERE}") or (0,))[0]  # noqa: S608
        )
        dangling_sql = """
            FROM audit_events c LEFT JOIN audit_events p ON p.event_id = c.parent_event_id
            WHERE c.parent_event_id IS NOT NULL AND p.event_id IS NULL AND c.parent_event_date IS NULL
        """
        report.dangling = int((one(con, f"SELECT count(*) {dangling_sql}") or (0,))[0])
        report.samples = [
            f"{r[0]} -> {r[1]}"
            for r in con.execute(
                f"SELECT c.event_id, c.parent_event_id {dangling_sql} ORDER BY c.recorded_at LIMIT ?",
                [samples],
            ).fetchall()
        ]
        report.blocked = int(
            (
                one(
                    con,
                    """SELECT count(*) FROM audit_events c WHERE c.parent_event_date IS NULL
                        AND c.parent_event_id IS NOT NULL AND EXISTS (
                          SELECT 1 FROM audit_events g
                          WHERE g.parent_event_id = c.event_id AND g.parent_event_date IS NOT NULL)""",
                )
                or (0,)
            )[0]
        )
        report.fk_violations = int(
            (
                one(
                    con,
                    """SELECT count(*) FROM audit_events c LEFT JOIN audit_events p
                         ON p.event_id = c.parent_event_id AND p.event_date = c.parent_event_date
                       WHERE c.parent_event_date IS NOT NULL AND p.event_id IS NULL""",
                )
                or (0,)
            )[0]
        )
    return report
