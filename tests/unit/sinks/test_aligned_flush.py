"""SpanStoreSink.flush_aligned (whole row groups, the rest kept) and the RowWatermarks that
release the Kafka events of rows once all of them are stored, against real DuckDB files."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.spans import generated_spans

from betrace.agents.app import build_pipeline
from betrace.config import load_settings
from betrace.metrics import InMemoryHooks
from betrace.rules.loader import RuleSet
from betrace.sinks.base import RowWatermarks
from betrace.sinks.duckdb_store import ROW_GROUP_ROWS, SpanStoreSink, TenantStore
from betrace.streams.codecs import table_to_ipc
from betrace.streams.topics import tenant_rows

GROUP = 256
KEYS = st.sampled_from("abc")
Op = tuple[str, dict[str, int]]


@pytest.fixture(scope="module")
def spans() -> pa.Table:
    """Real generated spans, decoded from OTLP protobuf."""
    return generated_spans(("default", "acme", "initech"), 3_000, seed=4, spans_per_message=50)


def stored_ids(store: TenantStore, tenant: str) -> list[str]:
    with store.cursor(tenant) as con:
        return [r[0] for r in con.execute("SELECT span_id FROM spans").fetchall()]


def chunks(table: pa.Table, rows: int) -> list[pa.Table]:
    return [table.slice(i, rows) for i in range(0, table.num_rows, rows)]


def test_the_row_group_is_duckdbs() -> None:
    assert ROW_GROUP_ROWS == 122_880


def test_whole_row_groups_are_written_and_the_rest_kept_in_order(store: TenantStore, spans: pa.Table) -> None:
    sink = SpanStoreSink(store, max_rows=spans.num_rows, hooks=InMemoryHooks())
    sink.row_group_rows = GROUP
    for part in chunks(spans, 37):
        sink.add(part, size=part.num_rows)
    per_tenant = tenant_rows(spans)
    assert all(n > GROUP for n in per_tenant.values())

    written = asyncio.run(sink.flush_aligned())
    assert written is not None

    assert written == {t: n // GROUP * GROUP for t, n in per_tenant.items()}
    assert len(sink) == spans.num_rows - sum(written.values())
    assert sink.due(max_age_s=0.0)  # the rest keeps its age
    for tenant, n in written.items():
        mine = spans.filter(pc.equal(spans.column("tenant"), tenant)).column("span_id").to_pylist()
        assert sorted(stored_ids(store, tenant)) == sorted(mine[:n])  # the first rows, in order
    asyncio.run(sink.flush())
    assert len(sink) == 0
    for tenant in per_tenant:
        mine = spans.filter(pc.equal(spans.column("tenant"), tenant)).column("span_id").to_pylist()
        assert sorted(stored_ids(store, tenant)) == sorted(mine)  # every span once
    assert sink.stored == spans.num_rows


def test_a_tenant_under_one_row_group_is_written_whole(store: TenantStore, spans: pa.Table) -> None:
    """Held back, a quiet tenant's spans could wait without bound behind a busy one."""
    acme = spans.filter(pc.equal(spans.column("tenant"), "acme"))
    busy = spans.filter(pc.equal(spans.column("tenant"), "default"))
    sink = SpanStoreSink(store, max_rows=spans.num_rows, hooks=InMemoryHooks())
    sink.row_group_rows = busy.num_rows // 2  # "default" has two whole groups (and a row or so)
    quiet = acme.slice(0, sink.row_group_rows - 1)
    sink.add(busy, size=busy.num_rows)
    sink.add(quiet, size=quiet.num_rows)
    written = asyncio.run(sink.flush_aligned())
    assert written == {"default": 2 * sink.row_group_rows, "acme": quiet.num_rows}
    assert len(sink) == busy.num_rows % 2
    assert len(stored_ids(store, "acme")) == quiet.num_rows
    assert asyncio.run(SpanStoreSink(store, max_rows=1, hooks=InMemoryHooks()).flush_aligned()) == {}


class FailingSink(SpanStoreSink):
    """The destination fails: every write raises, as a full disk would."""

    async def write_now(self, batch: list[pa.Table]) -> None:
        msg = "disk full"
        raise OSError(msg)


def test_a_failed_aligned_write_drops_the_rest_too(store: TenantStore, spans: pa.Table) -> None:
    sink = FailingSink(store, max_rows=spans.num_rows, hooks=InMemoryHooks())
    sink.row_group_rows = GROUP
    sink.add(spans, size=spans.num_rows)
    with pytest.raises(OSError, match="disk full"):
        asyncio.run(sink.flush_aligned())
    assert len(sink) == 0
    assert not sink.due(max_age_s=0.0)


def test_watermarks_release_a_token_when_all_its_rows_are_written() -> None:
    marks: RowWatermarks[str] = RowWatermarks()
    marks.hold("e1", {"a": 100})
    marks.hold("e2", {"a": 50, "b": 10})
    marks.hold("e3", {"b": 300})
    assert marks.written({"a": 120}) == ["e1"]
    assert marks.written({"b": 256}) == []  # e2 still has 30 rows of "a" buffered
    assert marks.written({"a": 30}) == ["e2"]
    assert len(marks) == 1
    assert marks.written_all() == ["e3"]
    assert len(marks) == 0
    marks.hold("e4", {"a": 1})  # counts restart once nothing waits
    assert marks.written({"a": 1}) == ["e4"]


def test_forget_gives_back_every_token_and_resets() -> None:
    marks: RowWatermarks[str] = RowWatermarks()
    marks.hold("e1", {"a": 3})
    marks.hold("e2", {"b": 3})
    assert marks.forget() == ["e1", "e2"]
    marks.hold("e3", {"a": 2})
    assert marks.written({"a": 2}) == ["e3"]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(
                st.just("hold"), st.dictionaries(st.sampled_from("abc"), st.integers(1, 50), min_size=1)
            ),
            st.tuples(st.just("write"), st.dictionaries(st.sampled_from("abc"), st.integers(0, 80))),
        ),
        max_size=40,
    )
)
def test_watermarks_release_exactly_the_fully_written_tokens_once(
    ops: list[tuple[str, dict[str, int]]],
) -> None:
    """Against a model: per key, a FIFO of rows tagged with their token."""
    marks: RowWatermarks[int] = RowWatermarks()
    fifo: dict[str, list[int]] = {}
    released: list[int] = []
    for n, (op, rows) in enumerate(ops):
        if op == "hold":
            marks.hold(n, rows)
            for key, count in rows.items():
                fifo.setdefault(key, []).extend([n] * count)
            continue
        done = {
            key: min(count, len(fifo.get(key, []))) for key, count in rows.items()
        }  # a sink writes what it has
        for key, count in done.items():
            del fifo.setdefault(key, [])[:count]
        waiting = {token for queue in fifo.values() for token in queue}
        out = marks.written(done)
        assert not set(out) & waiting
        released += out
        held = {token for token, (o, _) in enumerate(ops) if o == "hold" and token <= n}
        assert set(released) == held - waiting
    assert len(released) == len(set(released))
    assert set(released + marks.written_all()) == {t for t, (o, _) in enumerate(ops) if o == "hold"}


class Event:
    """The two things the span sink stage uses of a faust event: the message and ``ack``."""

    class Message:
        def __init__(self, value: bytes, offset: int) -> None:
            self.value, self.offset, self.partition = value, offset, 0

        def incref(self) -> None:
            pass

    def __init__(self, table: pa.Table, offset: int) -> None:
        self.message = Event.Message(table_to_ipc(table), offset)
        self.acked = False

    def ack(self) -> None:
        assert not self.acked, "acknowledged twice"
        self.acked = True


def test_the_stage_acknowledges_only_events_whose_spans_are_stored(tmp_path: Path, spans: pa.Table) -> None:
    acme = spans.filter(pc.equal(spans.column("tenant"), "acme"))
    cfg = load_settings(data_dir=tmp_path / "data", store_flush_rows=GROUP * 2)
    pipeline = build_pipeline(cfg, RuleSet([], lambda rule: rule))
    pipeline.span_sink.row_group_rows = GROUP
    pipeline.store.assign({0, 1, 2, 3})
    events = [Event(part, offset) for offset, part in enumerate(chunks(acme, 100))]

    async def run() -> None:
        for event in events:
            await pipeline._on_spans_store([event])

    try:
        asyncio.run(run())
        # Full at 600 rows: 512 written, the event whose rows straddle the cut stays held.
        stored = len(stored_ids(pipeline.store, "acme"))
        assert stored % GROUP == 0 and stored > 0
        acked = [e.message.offset for e in events if e.acked]
        assert acked == list(range(len(acked)))  # a prefix, in order
        assert sum(min(100, acme.num_rows - 100 * o) for o in acked) <= stored
        assert not events[-1].acked
        asyncio.run(pipeline._flush_spans())
        assert all(e.acked for e in events)
        assert sorted(stored_ids(pipeline.store, "acme")) == sorted(acme.column("span_id").to_pylist())
        held: dict[str, Any] = pipeline.held()
        assert held["span sink held messages"] == 0
    finally:
        pipeline.store.close()
