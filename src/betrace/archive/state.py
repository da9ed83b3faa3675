"""Per-unit archive state, kept *inside* the tenant's DuckDB file.

A unit is (day, kind, part). Keeping its state next to the data means the
hot-store delete and the move to ``cleaned`` commit in one transaction: a
crash leaves either both or neither.

State machine (``failed`` keeps ``last_good``, so the next run resumes there)::

    pending -> exported -> uploaded -> verified -> cleaned -> purged
       \\________ any step may end in failed (reason, attempts) ______/
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from typing import Any

import duckdb

STATES = ("pending", "exported", "uploaded", "verified", "cleaned", "purged", "failed")
ORDER = {s: i for i, s in enumerate(STATES[:-1])}

STATE_SQL = """
CREATE TABLE IF NOT EXISTS archive_days (
    day DATE NOT NULL,
    kind VARCHAR NOT NULL,
    part INTEGER NOT NULL,
    state VARCHAR NOT NULL,
    last_good VARCHAR NOT NULL,
    reason VARCHAR,
    attempts INTEGER NOT NULL DEFAULT 0,
    rows BIGINT NOT NULL DEFAULT 0,
    bytes BIGINT NOT NULL DEFAULT 0,
    keys VARCHAR[] NOT NULL DEFAULT [],
    checksums VARCHAR[] NOT NULL DEFAULT [],
    file_rows BIGINT[] NOT NULL DEFAULT [],
    min_ns BIGINT,
    max_ns BIGINT,
    ledger_posted BOOLEAN NOT NULL DEFAULT FALSE,
    updated_ns BIGINT NOT NULL,
    PRIMARY KEY (day, kind, part)
);
"""

COLUMNS = (
    "day",
    "kind",
    "part",
    "state",
    "last_good",
    "reason",
    "attempts",
    "rows",
    "bytes",
    "keys",
    "checksums",
    "file_rows",
    "min_ns",
    "max_ns",
    "ledger_posted",
    "updated_ns",
)


@dataclass(frozen=True, slots=True)
class Unit:
    day: dt.date
    kind: str
    part: int
    state: str
    last_good: str
    reason: str | None
    attempts: int
    rows: int
    bytes: int
    keys: tuple[str, ...]
    checksums: tuple[str, ...]
    file_rows: tuple[int, ...]
    min_ns: int | None
    max_ns: int | None
    ledger_posted: bool
    updated_ns: int

    @property
    def progress(self) -> str:
        """Where a run resumes: the state itself, or the last good one of a failed unit."""
        return self.last_good if self.state == "failed" else self.state

    @staticmethod
    def from_row(row: tuple[Any, ...]) -> Unit:
        v = dict(zip(COLUMNS, row, strict=True))
        for name in ("keys", "checksums", "file_rows"):
            v[name] = tuple(v[name] or ())
        return Unit(**v)


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(STATE_SQL)


def has_table(con: duckdb.DuckDBPyConnection) -> bool:
    row = con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'archive_days' AND schema_name = 'main'"
        " AND database_name = current_database()"
    ).fetchone()
    return bool(row and row[0])


def units(con: duckdb.DuckDBPyConnection, where: str = "TRUE", params: list[Any] | None = None) -> list[Unit]:
    if not has_table(con):
        return []
    sql = f"SELECT {', '.join(COLUMNS)} FROM archive_days WHERE {where} ORDER BY day, kind, part"  # noqa: S608
    return [Unit.from_row(r) for r in con.execute(sql, params or []).fetchall()]


def upsert(con: duckdb.DuckDBPyConnection, unit: Unit) -> None:
    values = [getattr(unit, c) for c in COLUMNS]
    values[COLUMNS.index("keys")] = list(unit.keys)
    values[COLUMNS.index("checksums")] = list(unit.checksums)
    values[COLUMNS.index("file_rows")] = list(unit.file_rows)
    values[COLUMNS.index("updated_ns")] = time.time_ns()
    marks = ", ".join("?" for _ in COLUMNS)
    con.execute(f"INSERT OR REPLACE INTO archive_days ({', '.join(COLUMNS)}) VALUES ({marks})", values)  # noqa: S608


def new_unit(day: dt.date, kind: str, part: int) -> Unit:
    return Unit(day, kind, part, "pending", "pending", None, 0, 0, 0, (), (), (), None, None, False, 0)
