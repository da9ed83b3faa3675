"""Rule versions, evaluation batches and emitted signals in the trail: causal parents, exactly once."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest

from betrace.agents.evaluate import EvaluateStage
from betrace.audit.events import AUDIT_PARENT_FIELD, AuditEventType, EventRef
from betrace.audit.recorder import DuckDBAuditRecorder
from betrace.audit.rules import RuleAuditor
from betrace.audit.store import AuditStore, EventFilter
from betrace.metrics import InMemoryHooks
from betrace.rules.loader import RuleSet
from betrace.rules.registry import RegistryState, encode, make_rule, propose, set_enabled
from betrace.sinks.duckdb_store import TenantStore
from betrace.sinks.signals import SignalSink

T = AuditEventType


def _apply(state: RegistryState, version: Any) -> None:
    key, value = encode(version)
    state.apply_record(key, value)


def _history() -> RegistryState:
    state = RegistryState()
    at = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    rule = make_rule(tenant="acme", rule_id="pii", expression="when { pii.access } always { audit.log }")
    _apply(state, propose(state, rule, author="alice", reason="GDPR", at=at))
    changed = make_rule(
        tenant="acme", rule_id="pii", expression="when { pii.access } always { audit.log }", severity="high"
    )
    _apply(state, propose(state, changed, author="bob", reason="raise", at=at + dt.timedelta(days=1)))
    _apply(state, set_enabled(state, "acme", "pii", enabled=False, author="carol", reason="noisy"))
    _apply(state, set_enabled(state, "acme", "pii", enabled=True, author="carol", reason="fixed"))
    return state


def test_each_rule_version_is_recorded_once_with_its_predecessor_as_parent(tmp_path: Path) -> None:
    path = tmp_path / "audit.duckdb"
    state = _history()
    # Two workers see the same topic, one of them twice (a reconnect re-reads it).
    for observers in ((RuleAuditor, 2), (RuleAuditor, 1)):
        with DuckDBAuditRecorder(path) as rec:
            auditor = observers[0](rec)
            for _ in range(observers[1]):
                auditor.observe(state)
    store = AuditStore(path)
    page = store.list_events(EventFilter(tenant="acme"), limit=100)
    types = [d["event_type"] for d in sorted(page.items, key=lambda d: d["payload"]["version"])]
    assert types == ["rule.created", "rule.changed", "rule.disabled", "rule.enabled"]
    latest = max(page.items, key=lambda d: d["payload"]["version"])
    chain = store.chain(latest["event_id"])
    assert chain is not None
    assert [d["actor"] for d in chain.ancestors] == ["carol", "bob", "alice"]
    assert page.items[0]["event_date"] == "2026-11-01"  # dated by the version's created_at


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TenantStore]:
    store = TenantStore(tmp_path / "data")
    yield store
    store.close()


def _traces() -> pa.Table:
    from betrace.streams.otlp import OtlpDecoder, Record
    from betrace.workload.generator import TraceGenerator
    from betrace.workload.otlp import batch_messages

    generator = TraceGenerator(tenants=("acme",), violation_rate=0.5, seed=4)
    records = [Record(m.value) for m in batch_messages(generator.traces(400), spans_per_message=100)]
    return OtlpDecoder(encoding="otlp_proto", tenant_header="h", default_tenant="acme").decode(records).spans


def test_signal_emitted_once_per_signal_with_its_evaluation_as_parent(
    tmp_path: Path, store: TenantStore
) -> None:
    path = tmp_path / "audit.duckdb"
    rec = DuckDBAuditRecorder(path, flush_interval_s=60, flush_events=100_000)
    hooks = InMemoryHooks()
    session = rec.record(T.WORKER_STARTED, actor="w", subject="worker")
    rule = make_rule(
        tenant="acme", rule_id="pii-audit", expression="when { pii.access } always { audit.log }"
    )
    stage = EvaluateStage(RuleSet([rule]), hooks, audit=rec)
    stage.session = session
    docs = stage.evaluate(_traces())
    assert docs, "the workload must plant violations"
    assert all(AUDIT_PARENT_FIELD in d for d in docs)
    published: list[dict[str, Any]] = []

    async def publish(batch: list[dict[str, Any]]) -> None:
        published.extend(batch)

    sink = SignalSink(store, publish, max_items=1000, hooks=hooks, audit=rec)
    asyncio.run(sink.write_now([dict(d) for d in docs]))
    assert len(published) == len(docs)
    assert all(AUDIT_PARENT_FIELD not in d for d in published)  # internal: never published
    # A crash after publishing but before the mark: the same signals are published again ...
    store.close()
    con = duckdb.connect(str(store.path("acme")))
    con.execute("UPDATE signals SET emitted = false")
    con.close()
    again = TenantStore(store.data_dir)
    try:
        sink2 = SignalSink(again, publish, max_items=1000, hooks=hooks, audit=rec)
        asyncio.run(sink2.write_now([dict(d) for d in docs]))
        asyncio.run(sink2.write_now([dict(d) for d in docs]))  # ... and a plain replay publishes nothing
    finally:
        again.close()
    rec.close()
    assert len(published) == 2 * len(docs)
    audit = AuditStore(path)
    emitted = audit.list_events(EventFilter(event_types=("signal.emitted",)), limit=10_000).items
    assert sorted(d["payload"]["signal_id"] for d in emitted) == sorted(d["signal_id"] for d in docs)
    batch = audit.list_events(EventFilter(event_types=("evaluation.batch",)), limit=10).items
    assert len(batch) == 1
    assert batch[0]["parent_event_id"] == session.event_id
    assert {d["parent_event_id"] for d in emitted} == {batch[0]["event_id"]}
    ref = EventRef.from_dict(docs[0][AUDIT_PARENT_FIELD])
    assert ref is not None
    assert ref.event_id == batch[0]["event_id"]
