"""TenantStore, SpanStoreSink and SignalSink against real DuckDB files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from tests.spans import generated_spans

from betrace.agents.evaluate import EvaluateStage
from betrace.errors import SinkError
from betrace.metrics import METRICS, InMemoryHooks
from betrace.rules.loader import RuleSet
from betrace.rules.model import Rule
from betrace.sinks.duckdb_store import SpanStoreSink, TenantStore
from betrace.sinks.signals import SignalSink
from betrace.sinks.store_schema import SPAN_COLUMNS_SQL


@pytest.fixture(scope="module")
def spans() -> pa.Table:
    """Real generated spans, decoded from OTLP protobuf."""
    return generated_spans(("default", "acme"), 500, seed=9)


def only(table: pa.Table, tenant: str) -> pa.Table:
    return table.filter(pc.equal(table.column("tenant"), tenant))


def signal(n: int, tenant: str = "acme", rule: str = "pii-audit") -> dict[str, Any]:
    return {
        "schema_version": 1,
        "signal_id": f"{tenant[:4]}{n:028x}",
        "tenant": tenant,
        "rule_id": rule,
        "rule_version": 2,
        "rule_name": "PII access is audited",
        "trace_id": f"{n:032x}",
        "span_ids": [f"{n:016x}"],
        "severity": "high",
        "message": "pii.access without audit.log",
        "detected_at": "2026-11-25T02:47:08.165Z",
        "source_produced_ms": 1_795_574_826_312,
    }


class Broker:
    """The publish callable SignalSink is given: records what was published, can fail."""

    def __init__(self) -> None:
        self.published: list[dict[str, Any]] = []
        self.calls = 0
        self.failures = 0

    async def __call__(self, docs: list[dict[str, Any]]) -> None:
        self.calls += 1
        if self.failures:
            self.failures -= 1
            raise SinkError("broker unavailable")
        self.published.extend(docs)


def test_insert_spans_is_idempotent(store: TenantStore, spans: pa.Table) -> None:
    acme = only(spans, "acme")
    assert store.insert_spans("acme", acme) == acme.num_rows
    assert store.insert_spans("acme", acme) == 0
    assert store.insert_spans("acme", pa.concat_tables([acme.slice(0, 5), acme.slice(0, 5)])) == 0
    assert store.span_counts() == {"acme": (acme.num_rows, acme.num_rows)}
    with store.cursor("acme") as con:
        stored = con.execute(f"SELECT {SPAN_COLUMNS_SQL} FROM spans ORDER BY trace_id, span_id").fetchall()
    expected = sorted(acme.to_pylist(), key=lambda r: (r["trace_id"], r["span_id"]))
    assert [dict(zip(acme.column_names, row, strict=True)) for row in stored] == expected


def test_each_tenant_has_its_own_file(store: TenantStore, spans: pa.Table, tmp_path: Path) -> None:
    for tenant in ("default", "acme"):
        store.insert_spans(tenant, only(spans, tenant))
    assert store.tenants() == ["acme", "default"]
    assert sorted(p.name for p in (tmp_path / "data").iterdir() if p.suffix == ".duckdb") == [
        "tenant=acme.duckdb",
        "tenant=default.duckdb",
    ]
    counts = store.span_counts()
    assert counts["acme"][0] == only(spans, "acme").num_rows
    assert counts["default"][0] == only(spans, "default").num_rows
    store.close()
    # Another process opens the files read-only and sees exactly that tenant's rows.
    con = duckdb.connect(str(store.path("acme")), read_only=True)
    try:
        tenants = con.execute("SELECT DISTINCT tenant FROM spans").fetchall()
    finally:
        con.close()
    assert tenants == [("acme",)]


def test_read_only_store_does_not_create_tenants(tmp_path: Path) -> None:
    reader = TenantStore(tmp_path / "nothing", read_only=True)
    try:
        assert reader.tenants() == []
        with pytest.raises(SinkError, match="no data for tenant 'ghost'"):
            reader.connection("ghost")
    finally:
        reader.close()
    assert not (tmp_path / "nothing").exists()


def test_record_signals_names_the_ones_recorded_earlier_and_never_marked(store: TenantStore) -> None:
    first = [signal(1), signal(2)]
    earlier, pending = store.record_signals("acme", first)
    assert (earlier, pending) == ({}, first)
    store.mark_emitted("acme", [first[0]["signal_id"]])
    earlier, pending = store.record_signals("acme", [signal(1), signal(2), signal(3), signal(2)])
    # signal 2 was recorded by an attempt that never marked it: the sink fences it
    assert list(earlier) == [signal(2)["signal_id"]]
    assert earlier[signal(2)["signal_id"]] > 0  # its recorded_ns, where the fence starts reading
    assert [d["signal_id"] for d in pending] == [signal(2)["signal_id"], signal(3)["signal_id"]]
    assert store.record_signals("acme", [signal(3)]) == (
        {signal(3)["signal_id"]: earlier_ns(store, 3)},
        [signal(3)],
    )


def earlier_ns(store: TenantStore, n: int) -> int:
    with store.cursor("acme") as con:
        row = con.execute(
            "SELECT recorded_ns FROM signals WHERE signal_id = ?", [signal(n)["signal_id"]]
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_insert_signals_returns_only_not_yet_emitted(store: TenantStore) -> None:
    first = [signal(1), signal(2)]
    assert store.insert_signals("acme", first) == first
    # Not emitted yet: a replay must hand them back for publishing.
    assert [d["signal_id"] for d in store.insert_signals("acme", first)] == [
        first[0]["signal_id"],
        first[1]["signal_id"],
    ]
    store.mark_emitted("acme", [first[0]["signal_id"]])
    again = store.insert_signals("acme", [signal(1), signal(2), signal(3), signal(3)])
    assert [d["signal_id"] for d in again] == [signal(2)["signal_id"], signal(3)["signal_id"]]
    store.mark_emitted("acme", [signal(2)["signal_id"], signal(3)["signal_id"]])
    assert store.insert_signals("acme", [signal(1), signal(2), signal(3)]) == []
    with store.cursor("acme") as con:
        rows = con.execute(
            "SELECT count(*), bool_and(emitted), min(rule_version), min(detected_at)::VARCHAR FROM signals"
        ).fetchone()
    assert rows is not None
    assert rows[:3] == (3, True, 2)
    assert rows[3].startswith("2026-11-25")


@pytest.mark.asyncio
async def test_span_sink_stores_each_tenant_once_across_replays(store: TenantStore, spans: pa.Table) -> None:
    hooks = InMemoryHooks()
    sink = SpanStoreSink(store, max_rows=10_000, hooks=hooks)
    sink.add(spans.slice(0, 200), size=200)
    sink.add(spans.slice(200), size=spans.num_rows - 200)
    await sink.flush()
    assert sink.stored == spans.num_rows
    sink.add(spans, size=spans.num_rows)  # a replay after a crash
    await sink.flush()
    assert sink.stored == spans.num_rows
    assert {t: c[0] for t, c in store.span_counts().items()} == {
        t: only(spans, t).num_rows for t in ("acme", "default")
    }
    assert hooks.total("betrace_sink_rows_total", sink="duckdb") == 2 * spans.num_rows


@pytest.mark.asyncio
async def test_signal_sink_publishes_each_signal_once_across_replays(store: TenantStore) -> None:
    broker = Broker()
    sink = SignalSink(store, broker, max_items=100, hooks=InMemoryHooks())
    for doc in (signal(1), signal(2), signal(1, tenant="globex")):
        sink.add(doc)
    await sink.flush()
    assert sorted((d["tenant"], d["signal_id"]) for d in broker.published) == sorted(
        [
            ("acme", signal(1)["signal_id"]),
            ("acme", signal(2)["signal_id"]),
            ("globex", signal(1, "globex")["signal_id"]),
        ]
    )
    assert broker.calls == 1  # one publish per batch, whatever its tenants
    for doc in (signal(1), signal(2), signal(1, tenant="globex"), signal(2)):
        sink.add(doc)
    await sink.flush()
    assert len(broker.published) == 3
    assert sink.emitted == 3
    assert store.tenants() == ["acme", "globex"]


@pytest.mark.asyncio
async def test_signal_sink_republishes_after_a_failed_publish(store: TenantStore) -> None:
    broker = Broker()
    broker.failures = 1
    sink = SignalSink(store, broker, max_items=100, hooks=InMemoryHooks())
    sink.add(signal(7))
    with pytest.raises(SinkError, match="broker unavailable"):
        await sink.flush()
    assert broker.published == []
    assert len(sink) == 0
    # Kafka redelivers the verdict: it is still pending in the store, so it goes out now.
    sink.add(signal(7))
    await sink.flush()
    assert [d["signal_id"] for d in broker.published] == [signal(7)["signal_id"]]
    sink.add(signal(7))
    await sink.flush()
    assert len(broker.published) == 1
    assert sink.emitted == 1


@pytest.mark.asyncio
async def test_signals_from_the_evaluate_stage_are_published_once(
    store: TenantStore, spans: pa.Table
) -> None:
    rules = RuleSet(
        Rule(id="pii", tenant=t, name="PII", expression="when { pii.access } always { audit.log }")
        for t in ("default", "acme")
    )
    docs = EvaluateStage(rules, InMemoryHooks()).evaluate(spans)
    assert docs
    broker = Broker()
    sink = SignalSink(store, broker, max_items=1_000, hooks=InMemoryHooks())
    for _ in range(2):
        for doc in docs:
            sink.add(doc)
        await sink.flush()
    assert sorted(d["signal_id"] for d in broker.published) == sorted(d["signal_id"] for d in docs)


@pytest.mark.asyncio
async def test_signal_sink_reports_only_declared_metrics(store: TenantStore) -> None:
    hooks = InMemoryHooks()
    sink = SignalSink(store, Broker(), max_items=10, hooks=hooks)
    sink.add(signal(1))
    sink.add(signal(2))
    await sink.flush()
    assert hooks.total("betrace_signals_emitted_total", rule="pii-audit", severity="high") == 2
    assert hooks.total("betrace_sink_rows_total", sink="signals") == 2
    declared = {m.name: set(m.labels) for m in METRICS}
    for name, labels in [*hooks.counters, *hooks.observations]:
        assert name in declared
        assert {k for k, _ in labels} == declared[name]
