"""The ``audit_events`` table in ``<data_dir>/audit.duckdb`` and the SQL shared by its readers.

What DuckDB 2.0 gives, and how the schema uses it (checked against 2.0.0):

* A self-referencing FOREIGN KEY over ``(parent_event_id, parent_event_date)``
  is enforced: inserting a child of an unknown parent and deleting a parent
  that has children are both refused. A row whose ``parent_event_date`` is
  NULL is not checked (MATCH SIMPLE): that is how rows from before the
  column existed ("legacy" rows) stay valid until ``betrace audit backfill``.
* The check sees rows committed by earlier statements only, not other rows
  of the same INSERT: a batch is inserted level by level (parents first).
* An UPDATE of a column that is part of a constraint is a delete plus an
  insert, so a row that children already reference can no longer be
  updated; the backfill therefore fills parents before their children.
* ART indexes are used for scans only on a single column, and only when the
  filter on that column is the whole WHERE clause (no partial indexes,
  composite indexes are not scanned; ``EXPLAIN ANALYZE`` shows the choice,
  which is made at run time). Hence one index on ``parent_event_id`` for
  the children lookup (event ids are unique, so the date adds nothing to
  it) and a unique index on ``event_id`` for lookups by id and for the
  idempotent events.
"""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path
from typing import Any

import duckdb
import orjson

FILE_NAME = "audit.duckdb"
SCHEMA_VERSION = 1

COLUMNS = (
    "event_id",
    "event_date",
    "parent_event_id",
    "parent_event_date",
    "event_type",
    "actor",
    "tenant",
    "subject",
    "outcome",
    "payload",
    "occurred_at",
    "recorded_at",
)
SELECT_COLUMNS = ", ".join(COLUMNS)

DDL = (
    """
    CREATE TABLE IF NOT EXISTS audit_events (
        event_id          VARCHAR NOT NULL,
        event_date        DATE    NOT NULL,
        parent_event_id   VARCHAR,
        -- NULL only on legacy rows (recorded before the column existed): see backfill
        parent_event_date DATE,
        event_type        VARCHAR NOT NULL,
        actor             VARCHAR NOT NULL,
        tenant            VARCHAR,
        subject           VARCHAR NOT NULL,
        outcome           VARCHAR NOT NULL,
        payload           JSON,
        occurred_at       BIGINT  NOT NULL,  -- ns since the epoch: when it happened
        recorded_at       BIGINT  NOT NULL,  -- ns, strictly increasing in commit order: the cursor key
        PRIMARY KEY (event_id, event_date),
        FOREIGN KEY (parent_event_id, parent_event_date) REFERENCES audit_events (event_id, event_date)
    )
    """,
    "CREATE UNIQUE INDEX IF NOT EXISTS audit_events_event_id ON audit_events (event_id)",
    "CREATE INDEX IF NOT EXISTS audit_events_parent_lookup ON audit_events (parent_event_id)",
    "CREATE TABLE IF NOT EXISTS audit_meta (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL)",
    f"INSERT OR IGNORE INTO audit_meta VALUES ('schema_version', '{SCHEMA_VERSION}')",  # noqa: S608
)

#: The children of one event. Nothing but the indexed column in the WHERE clause, so
#: that DuckDB answers it with an index scan (see the module docstring).
CHILDREN_SQL = f"SELECT {SELECT_COLUMNS} FROM audit_events WHERE parent_event_id = ?"  # noqa: S608
BY_ID_SQL = f"SELECT {SELECT_COLUMNS} FROM audit_events WHERE event_id = ?"  # noqa: S608


#: One open of the file at a time per process. DuckDB refuses a read-only connection to a
#: file the same process has open read-write ("different configuration") instead of
#: waiting, and the recorder's clock read-then-insert must not interleave either; other
#: processes are kept out by DuckDB's file lock (see betrace.sinks.shared_file).
_FILE_LOCKS: dict[str, threading.Lock] = {}
_FILE_LOCKS_GUARD = threading.Lock()


def file_lock(path: Path) -> threading.Lock:
    with _FILE_LOCKS_GUARD:
        return _FILE_LOCKS.setdefault(str(path.resolve()), threading.Lock())


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    for statement in DDL:
        con.execute(statement)


def one(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> tuple[Any, ...] | None:
    """The first row of a query, with the result consumed to the end.

    DuckDB 2.0 refuses further work (``register``...) on a connection whose
    last result was not read to its end, which ``fetchone`` leaves it in.
    """
    rows = con.execute(sql, params or []).fetchall()
    return rows[0] if rows else None


def table_exists(con: duckdb.DuckDBPyConnection) -> bool:
    # A probe of the table itself: listing the catalog (duckdb_tables()) costs ~20 ms per open.
    try:
        con.execute("SELECT 1 FROM audit_events LIMIT 0").fetchall()
    except duckdb.CatalogException:
        return False
    return True


def _ns_to_rfc3339(ns: int) -> str:
    stamp = dt.datetime.fromtimestamp(ns / 1e9, dt.UTC)
    return stamp.isoformat(timespec="microseconds").replace("+00:00", "Z")


def row_to_dict(row: tuple[Any, ...]) -> dict[str, Any]:
    """One ``SELECT_COLUMNS`` row as the JSON document the API and the CLI show."""
    doc = dict(zip(COLUMNS, row, strict=True))
    doc["event_date"] = doc["event_date"].isoformat()
    if doc["parent_event_date"] is not None:
        doc["parent_event_date"] = doc["parent_event_date"].isoformat()
    payload = doc["payload"]
    doc["payload"] = orjson.loads(payload) if payload else {}
    doc["occurred_at"] = _ns_to_rfc3339(int(doc["occurred_at"]))
    doc["recorded_at"] = int(doc["recorded_at"])
    return doc
