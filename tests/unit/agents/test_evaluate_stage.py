"""EvaluateStage: signal documents, deterministic ids and tenant isolation."""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa

from betrace.agents.evaluate import EvaluateStage, signal_id
from betrace.metrics import METRICS, InMemoryHooks
from betrace.rules.loader import RuleSet
from betrace.rules.model import Rule
from betrace.streams.schemas import SIGNAL_SCHEMA_VERSION, SPAN_SCHEMA

PII = Rule(
    id="pii-audit",
    tenant="acme",
    name="PII access is audited",
    expression="when { pii.access } always { audit.log }",
    severity="high",
    version=3,
)
PAYMENT = Rule(
    id="fraud",
    tenant="acme",
    name="Charges are fraud-checked",
    expression="when { payment.charge } always { payment.fraud_check }",
    severity="critical",
)
GLOBEX_PAYMENT = Rule(
    id="fraud",
    tenant="globex",
    name="Charges are fraud-checked",
    expression="when { payment.charge } always { payment.fraud_check }",
    severity="low",
)
SIGNAL_FIELDS = {
    "schema_version",
    "signal_id",
    "tenant",
    "rule_id",
    "rule_version",
    "rule_name",
    "trace_id",
    "span_ids",
    "severity",
    "message",
    "detected_at",
    "source_produced_ms",
}


def trace_ids(n: int, prefix: str = "a") -> list[str]:
    return [f"{prefix}{i:031x}" for i in range(n)]


def table(rows: list[tuple[str, str, str, int]]) -> pa.Table:
    """Spans from ``(tenant, trace_id, name, produced_ms)``; the first span of a trace is its root."""
    cols: dict[str, list[Any]] = {name: [] for name in SPAN_SCHEMA.names}
    roots: dict[tuple[str, str], str] = {}
    for i, (tenant, trace, name, produced) in enumerate(rows):
        span_id = f"{i + 1:016x}"
        parent = roots.setdefault((tenant, trace), span_id)
        cols["tenant"].append(tenant)
        cols["trace_id"].append(trace)
        cols["span_id"].append(span_id)
        cols["parent_span_id"].append(None if parent == span_id else parent)
        cols["name"].append(name)
        cols["service"].append("svc")
        cols["kind"].append(1)
        cols["status_code"].append(0)
        cols["start_ns"].append(1_000 + i)
        cols["end_ns"].append(2_000 + i)
        cols["attributes"].append("{}")
        cols["resource_attributes"].append("{}")
        cols["produced_ms"].append(produced)
    return pa.table(cols, schema=SPAN_SCHEMA)


def by_key(signals: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    keyed = {(s["tenant"], s["rule_id"], s["trace_id"]): s for s in signals}
    assert len(keyed) == len(signals), "one signal per (tenant, rule, trace)"
    return keyed


def test_signal_id_is_deterministic_and_fixed() -> None:
    trace = "0af7651916cd43dd8448eb211c80319c"
    rule = Rule(id="pii-audit", tenant="acme", name="n", expression="x")
    assert signal_id("acme", rule, trace) == "5631c83934c1331bed0516319a71cea9"
    expected = hashlib.sha256(f"acme\x1fpii-audit\x1f1\x1f{trace}".encode()).hexdigest()[:32]
    assert signal_id("acme", rule, trace) == expected
    assert re.fullmatch(r"[0-9a-f]{32}", signal_id("acme", rule, trace))


def test_signal_id_changes_with_tenant_rule_version_and_trace() -> None:
    trace = "0af7651916cd43dd8448eb211c80319c"
    base = signal_id("acme", PII, trace)
    assert signal_id("acme", PII, trace) == base
    others = {
        signal_id("globex", PII, trace),
        signal_id("acme", PAYMENT, trace),
        signal_id("acme", Rule(**{**_fields(PII), "version": 4}), trace),
        signal_id("acme", PII, "1" * 32),
    }
    assert base not in others
    assert len(others) == 4
    # Only identity counts: renaming a rule or changing its severity keeps the id.
    renamed = Rule(**{**_fields(PII), "name": "other", "severity": "low"})
    assert signal_id("acme", renamed, trace) == base


def _fields(rule: Rule) -> dict[str, Any]:
    return {f: getattr(rule, f) for f in rule.__slots__}


def test_signal_document_has_every_documented_field() -> None:
    ok, bad = trace_ids(2)
    spans = table(
        [
            ("acme", ok, "http.request", 10),
            ("acme", ok, "pii.access", 11),
            ("acme", ok, "audit.log", 12),
            ("acme", bad, "http.request", 20),
            ("acme", bad, "pii.access", 25),
            ("acme", bad, "db.query", 22),
        ]
    )
    before = datetime.now(UTC)
    hooks = InMemoryHooks()
    [doc] = EvaluateStage(RuleSet([PII]), hooks).evaluate(spans)
    after = datetime.now(UTC)

    assert set(doc) == SIGNAL_FIELDS
    assert doc["schema_version"] == SIGNAL_SCHEMA_VERSION == 1
    assert doc["signal_id"] == signal_id("acme", PII, bad)
    assert (doc["tenant"], doc["rule_id"], doc["rule_version"]) == ("acme", "pii-audit", 3)
    assert (doc["rule_name"], doc["severity"]) == ("PII access is audited", "high")
    assert doc["trace_id"] == bad
    assert doc["span_ids"] == ["0000000000000005"]  # the `when` span: the unaudited pii.access
    # docs/signals.md gives "'pii.access' occurred without 'audit.log'" as an example only.
    assert "pii.access" in doc["message"]
    assert "audit.log" in doc["message"]
    assert doc["source_produced_ms"] == 25  # latest source timestamp of the trace
    assert doc["detected_at"].endswith("Z")
    detected = datetime.fromisoformat(doc["detected_at"])
    assert before - timedelta(milliseconds=1) <= detected <= after
    assert hooks.total("betrace_signals_total", rule="pii-audit", severity="high") == 1


def test_one_signal_per_rule_and_trace() -> None:
    t1, t2, t3 = trace_ids(3)
    spans = table(
        [
            ("acme", t1, "pii.access", 1),
            ("acme", t1, "pii.access", 1),  # two violating spans: still one signal
            ("acme", t1, "payment.charge", 1),
            ("acme", t2, "payment.charge", 1),
            ("acme", t2, "payment.fraud_check", 1),
            ("acme", t3, "http.request", 1),
        ]
    )
    signals = EvaluateStage(RuleSet([PII, PAYMENT]), InMemoryHooks()).evaluate(spans)
    keyed = by_key(signals)
    assert set(keyed) == {("acme", "pii-audit", t1), ("acme", "fraud", t1)}
    # Both `when` spans are evidence, sorted (docs/signals.md).
    assert keyed["acme", "pii-audit", t1]["span_ids"] == ["0000000000000001", "0000000000000002"]
    assert keyed["acme", "fraud", t1]["span_ids"] == ["0000000000000003"]


def test_replaying_a_trace_gives_the_same_signal_ids() -> None:
    t1, t2 = trace_ids(2)
    spans = table([("acme", t1, "pii.access", 1), ("acme", t2, "payment.charge", 2)])
    stage = EvaluateStage(RuleSet([PII, PAYMENT]), InMemoryHooks())
    first = sorted(s["signal_id"] for s in stage.evaluate(spans))
    second = sorted(s["signal_id"] for s in stage.evaluate(spans.slice(0, 1)))
    third = sorted(s["signal_id"] for s in stage.evaluate(spans))
    assert len(first) == 2
    assert second == [signal_id("acme", PII, t1)]
    assert first == third


def test_tenant_spans_only_meet_their_own_rules() -> None:
    a1, a2 = trace_ids(2, "a")
    b1, b2 = trace_ids(2, "b")
    spans = table(
        [
            ("acme", a1, "pii.access", 1),
            ("globex", b1, "pii.access", 1),  # globex has no PII rule
            ("globex", b2, "payment.charge", 1),
            ("acme", a2, "payment.charge", 1),
            ("other", "c" * 32, "pii.access", 1),  # no rules at all
        ]
    )
    signals = EvaluateStage(RuleSet([PII, PAYMENT, GLOBEX_PAYMENT]), InMemoryHooks()).evaluate(spans)
    keyed = by_key(signals)
    assert set(keyed) == {
        ("acme", "pii-audit", a1),
        ("acme", "fraud", a2),
        ("globex", "fraud", b2),
    }
    assert keyed["globex", "fraud", b2]["severity"] == "low"
    assert keyed["acme", "fraud", a2]["severity"] == "critical"
    assert keyed["globex", "fraud", b2]["signal_id"] != signal_id("acme", PAYMENT, b2)


def test_same_trace_id_in_two_tenants_is_judged_separately() -> None:
    [shared] = trace_ids(1)
    spans = table(
        [
            ("acme", shared, "payment.charge", 1),
            ("globex", shared, "payment.charge", 1),
            ("globex", shared, "payment.fraud_check", 1),
        ]
    )
    signals = EvaluateStage(RuleSet([PAYMENT, GLOBEX_PAYMENT]), InMemoryHooks()).evaluate(spans)
    assert [(s["tenant"], s["trace_id"]) for s in signals] == [("acme", shared)]


def test_disabled_rules_and_empty_input_produce_nothing() -> None:
    disabled = Rule(**{**_fields(PII), "enabled": False})
    stage = EvaluateStage(RuleSet([disabled]), InMemoryHooks())
    [trace] = trace_ids(1)
    assert stage.evaluate(table([("acme", trace, "pii.access", 1)])) == []
    assert stage.evaluate(SPAN_SCHEMA.empty_table()) == []


def test_evaluate_reports_only_declared_metrics() -> None:
    [trace] = trace_ids(1)
    hooks = InMemoryHooks()
    EvaluateStage(RuleSet([PII]), hooks).evaluate(table([("acme", trace, "pii.access", 1)]))
    declared = {m.name: set(m.labels) for m in METRICS}
    reported = [*hooks.counters, *hooks.observations, *hooks.gauges]
    assert {name for name, _ in reported} >= {"betrace_signals_total", "betrace_evaluate_seconds"}
    for name, labels in reported:
        assert name in declared
        assert {k for k, _ in labels} == declared[name]
