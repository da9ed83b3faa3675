"""What DuckDB itself enforces on audit_events, and that the children lookup uses the index."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from betrace.audit.events import AuditEventType, EventRef
from betrace.audit.recorder import DuckDBAuditRecorder
from betrace.audit.schema import CHILDREN_SQL, ensure_schema


def _fresh(path: Path) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(str(path))
    ensure_schema(con)
    return con


def test_foreign_key_is_enforced_by_duckdb(tmp_path: Path) -> None:
    path = tmp_path / "audit.duckdb"
    with DuckDBAuditRecorder(path) as rec:
        parent = rec.record(AuditEventType.WORKER_STARTED, actor="w", subject="worker")
        child = rec.record(AuditEventType.WORKER_STOPPED, actor="w", subject="worker", parent=parent)
        leaf = rec.record(AuditEventType.WORKER_STARTED, actor="w", subject="other")
    con = duckdb.connect(str(path))
    try:
        # A raw DELETE of a parent that has children: refused by the database itself.
        with pytest.raises(duckdb.ConstraintException, match="foreign key"):
            con.execute("DELETE FROM audit_events WHERE event_id = ?", [parent.event_id])
        # A child naming an unknown parent: refused.
        with pytest.raises(duckdb.ConstraintException, match="foreign key"):
            con.execute(
                "INSERT INTO audit_events VALUES ('x', DATE '2026-01-01', 'nope', DATE '2026-01-01', "
                "'worker.stopped', 'w', NULL, 's', 'ok', NULL, 1, 1)"
            )
        # The composite primary key and the unique event id.
        with pytest.raises(duckdb.ConstraintException):
            con.execute(
                "INSERT INTO audit_events SELECT * REPLACE (DATE '2020-01-01' AS event_date) "
                "FROM audit_events WHERE event_id = ?",
                [leaf.event_id],
            )
        # A legacy row (before parent_event_date existed) is accepted with a NULL date.
        con.execute(
            "INSERT INTO audit_events VALUES ('legacy', DATE '2026-01-01', ?, NULL, "
            "'worker.stopped', 'w', NULL, 's', 'ok', NULL, 1, 2)",
            [parent.event_id],
        )
        rows = con.execute(
            "SELECT count(*) FROM audit_events WHERE event_id = ?", [child.event_id]
        ).fetchall()
        assert rows == [(1,)]
    finally:
        con.close()


def test_children_lookup_is_an_index_scan(tmp_path: Path) -> None:
    con = _fresh(tmp_path / "audit.duckdb")
    # 200,000 events: 20,000 roots with 9 children each, generated in SQL (parents first).
    for where, parent in (("i % 10 = 0", None), ("i % 10 <> 0", "i - i % 10")):
        pid = "NULL" if parent is None else f"'e' || ({parent})"
        pdate = "NULL" if parent is None else "DATE '2026-01-01'"
        con.execute(
            f"INSERT INTO audit_events SELECT 'e' || i, DATE '2026-01-01', {pid}, {pdate}, "
            "'evaluation.batch', 'w', 'acme', 's', 'ok', NULL, i, i FROM range(200000) t(i) "
            f"WHERE {where}"
        )
    plan = "\n".join(
        str(r[1]) for r in con.execute(f"EXPLAIN ANALYZE {CHILDREN_SQL}", ["e150000"]).fetchall()
    )
    assert "Index Scan" in plan, plan
    assert "Sequential Scan" not in plan, plan
    assert len(con.execute(CHILDREN_SQL, ["e150000"]).fetchall()) == 9
    con.close()


def test_event_ref_round_trip() -> None:
    ref = EventRef.new()
    assert EventRef.from_dict(ref.to_dict()) == ref
    assert EventRef.from_dict({"event_id": "x y", "event_date": "2026-01-01"}) is None
    assert EventRef.from_dict({"event_id": "x", "event_date": "not a date"}) is None
    assert EventRef.from_dict(None) is None
