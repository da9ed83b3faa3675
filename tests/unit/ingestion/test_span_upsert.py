"""Span upserts on (trace_id, span_id) in a real DuckDB file: counts stay, newer versions win."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from tests.spans import generated_spans

from betrace.agents.ingest import DedupeCache, IngestStage
from betrace.config import load_settings
from betrace.errors import SinkError
from betrace.metrics import InMemoryHooks
from betrace.sinks.duckdb_store import TenantStore


@pytest.fixture(scope="module")
def spans() -> pa.Table:
    return generated_spans(("acme",), 400, seed=11)


def with_values(table: pa.Table, row: int, **values: Any) -> pa.Table:
    """``table`` with column values of one row replaced."""
    out = table
    for name, value in values.items():
        col = out.column(name).to_pylist()
        col[row] = value
        field = out.schema.field(name)
        out = out.set_column(out.schema.get_field_index(name), field, pa.array(col, field.type))
    return out


def summary(store: TenantStore, trace_id: str) -> tuple[Any, ...]:
    with store.cursor("acme") as con:
        row = con.execute(
            "SELECT span_count, error_count, end_ns, ingested_ns FROM traces WHERE trace_id = ?", [trace_id]
        ).fetchone()
    assert row is not None
    return tuple(row)


def stored_row(store: TenantStore, trace_id: str, span_id: str) -> tuple[Any, ...]:
    with store.cursor("acme") as con:
        rows = con.execute(
            "SELECT end_ns, status_code, name FROM spans WHERE trace_id = ? AND span_id = ?",
            [trace_id, span_id],
        ).fetchall()
    assert len(rows) == 1
    return tuple(rows[0])


def test_replay_changes_nothing(store: TenantStore, spans: pa.Table) -> None:
    first = store.upsert_spans("acme", spans)
    assert (first.inserted, first.updated) == (spans.num_rows, 0)
    counts = store.span_counts()
    again = store.upsert_spans("acme", spans)
    assert (again.inserted, again.updated) == (0, 0)
    assert store.span_counts() == counts == {"acme": (spans.num_rows, spans.num_rows)}


def test_later_end_time_updates_the_row_and_the_summary(store: TenantStore, spans: pa.Table) -> None:
    store.upsert_spans("acme", spans)
    trace_id, span_id = spans.column("trace_id")[5].as_py(), spans.column("span_id")[5].as_py()
    count, errors, end, ingested = summary(store, trace_id)
    later = end + 5_000_000_000
    newer = with_values(spans.slice(5, 1), 0, end_ns=later, status_code=2, name="renamed")
    result = store.upsert_spans("acme", newer)
    assert (result.inserted, result.updated) == (0, 1)
    assert stored_row(store, trace_id, span_id) == (later, 2, "renamed")
    was_error = spans.column("status_code")[5].as_py() == 2
    assert summary(store, trace_id) == (count, errors + (0 if was_error else 1), later, ingested)
    assert store.span_counts() == {"acme": (spans.num_rows, spans.num_rows)}
    # The older version replayed afterwards does not win back.
    assert store.upsert_spans("acme", spans).updated == 0
    assert stored_row(store, trace_id, span_id) == (later, 2, "renamed")


def test_status_rank_orders_versions_at_the_same_end(store: TenantStore, spans: pa.Table) -> None:
    one = with_values(spans.slice(0, 1), 0, status_code=0)
    trace_id, span_id = one.column("trace_id")[0].as_py(), one.column("span_id")[0].as_py()
    end = one.column("end_ns")[0].as_py()
    store.upsert_spans("acme", one)
    assert store.upsert_spans("acme", with_values(one, 0, status_code=2)).updated == 1  # unset -> error
    assert store.upsert_spans("acme", with_values(one, 0, status_code=1)).updated == 1  # error -> ok (final)
    assert store.upsert_spans("acme", with_values(one, 0, status_code=2)).updated == 0
    assert stored_row(store, trace_id, span_id)[:2] == (end, 1)


def test_two_versions_in_one_batch_keep_the_newest(store: TenantStore, spans: pa.Table) -> None:
    one = spans.slice(0, 1)
    end = one.column("end_ns")[0].as_py()
    both = pa.concat_tables([with_values(one, 0, end_ns=end + 10), one])
    result = store.upsert_spans("acme", both)
    assert (result.inserted, result.updated) == (1, 0) or (result.inserted, result.updated) == (1, 1)
    trace_id, span_id = one.column("trace_id")[0].as_py(), one.column("span_id")[0].as_py()
    assert stored_row(store, trace_id, span_id)[0] == end + 10
    assert store.span_counts() == {"acme": (1, 1)}


def test_dedupe_cache_drops_exact_replays_but_passes_updates(spans: pa.Table) -> None:
    stage = IngestStage(load_settings(dedupe_cache_size=1000), InMemoryHooks())
    assert isinstance(stage.dedupe, DedupeCache)
    first = stage.dedupe_table(spans)
    assert first.num_rows == spans.num_rows
    assert stage.dedupe_table(spans).num_rows == 0
    ends = pc.add(spans.column("end_ns"), 1)
    updated = spans.set_column(spans.schema.get_field_index("end_ns"), spans.schema.field("end_ns"), ends)
    assert stage.dedupe_table(updated.slice(0, 7)).num_rows == 7
    assert stage.dedupe_table(updated.slice(0, 7)).num_rows == 0


def summaries_match_spans(store: TenantStore) -> bool:
    """The ``traces`` view agrees with a recount of the stored spans, trace by trace."""
    with store.cursor("acme") as con:
        diff = con.execute(
            "SELECT count(*) FROM (SELECT trace_id, span_count, error_count, end_ns FROM traces "
            "EXCEPT SELECT trace_id, count(*), count(*) FILTER (WHERE status_code = 2), max(end_ns) "
            "FROM spans GROUP BY trace_id)"
        ).fetchone()
        row = con.execute("SELECT count(*) FROM traces").fetchone()
        traces = con.execute("SELECT count(DISTINCT trace_id) FROM spans").fetchone()
    return diff == (0,) and row == traces


def test_batch_of_new_and_known_spans_stores_only_the_new(store: TenantStore, spans: pa.Table) -> None:
    half = spans.num_rows // 2
    assert store.upsert_spans("acme", spans.slice(0, half)).inserted == half
    result = store.upsert_spans("acme", spans)  # known keys send it down the slow path
    assert (result.inserted, result.updated) == (spans.num_rows - half, 0)
    assert store.span_counts() == {"acme": (spans.num_rows, spans.num_rows)}
    assert summaries_match_spans(store)


def test_a_rejected_batch_writes_nothing(store: TenantStore, spans: pa.Table) -> None:
    store.upsert_spans("acme", spans.slice(0, 10))
    with store.cursor("acme") as con:
        parts = con.execute("SELECT count(*) FROM trace_summaries").fetchone()
    bad = with_values(spans.slice(10, 20), 5, name=None)  # NOT NULL: both paths refuse it
    with pytest.raises(SinkError, match="span insert failed"):
        store.upsert_spans("acme", bad)
    assert store.span_counts() == {"acme": (10, 10)}
    with store.cursor("acme") as con:
        assert con.execute("SELECT count(*) FROM trace_summaries").fetchone() == parts
    assert store.upsert_spans("acme", spans.slice(10, 20)).inserted == 20
    assert summaries_match_spans(store)
