"""A real worker process over a real broker records its session, the rules and every signal once."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from betrace.audit.store import AuditStore, EventFilter
from betrace.config import Settings
from betrace.workload.generator import TraceGenerator
from betrace.workload.otlp import batch_messages
from tests.integration.helpers import read_topic, run_worker_over


def test_worker_session_rules_and_signals_in_the_trail_even_on_replay(
    pipeline_settings: Settings, tmp_path: Path
) -> None:
    cfg = pipeline_settings
    gen = TraceGenerator(tenants=("acme",), violation_rate=0.3, seed=11)
    messages = list(batch_messages(gen.traces(3_000), spans_per_message=150))
    assert gen.truth.expected

    run_worker_over(cfg, tmp_path / "worker1.log", messages)
    run_worker_over(cfg, tmp_path / "worker2.log", messages)  # the same input again: a replay

    signals = {r.key.decode() for r in read_topic(cfg, cfg.topics.signals)}
    store = AuditStore.from_settings(cfg)
    events = store.list_events(EventFilter(), limit=100_000).items
    by_type = Counter(d["event_type"] for d in events)
    by_id = {d["event_id"]: d for d in events}

    starts = [d for d in events if d["event_type"] == "worker.started"]
    stops = [d for d in events if d["event_type"] == "worker.stopped"]
    assert len(starts) == len(stops) == 2
    assert {d["parent_event_id"] for d in stops} == {d["event_id"] for d in starts}

    # The seed rules of config/rules/, once each although two worker sessions read the topic.
    rules = [d for d in events if d["event_type"].startswith("rule.")]
    assert rules
    assert len({(d["tenant"], d["payload"]["rule_id"]) for d in rules}) == len(rules)
    assert all(d["event_type"] == "rule.created" and d["actor"] == "betrace-seed" for d in rules)

    # Exactly one signal.emitted per signal on the topic, each below the evaluation that found it.
    emitted = [d for d in events if d["event_type"] == "signal.emitted"]
    assert sorted(d["payload"]["signal_id"] for d in emitted) == sorted(signals)
    for doc in emitted:
        parent = by_id[doc["parent_event_id"]]
        assert parent["event_type"] == "evaluation.batch"
        assert parent["tenant"] == doc["tenant"] == "acme"
        assert by_id[parent["parent_event_id"]]["event_type"] == "worker.started"
    assert by_type["evaluation.batch"] >= 1
