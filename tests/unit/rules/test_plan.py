"""evaluate_batch: one evaluation per distinct program gives exactly the per-tenant answer."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest
from tests.unit.rules.rules_spans import make_table

from betrace.rules.engine import compile_rule
from betrace.rules.model import Rule, Violation
from betrace.rules.plan import (
    Findings,
    evaluate_batch,
    evaluate_per_tenant,
    trace_ids_unique_per_tenant,
)
from betrace.workload.generator import TraceGenerator

PACK = (
    ("pii", "betrace", "when { pii.access } always { audit.log }"),
    ("fraud", "betrace", "when { payment.charge_card } always { payment.fraud_check }"),
    ("errors", "traceql", "{ status = error }"),
    ("slow-db", "betrace", "when { db.query.where(rows > 500) } always { cache.get }"),
)


def _rules(tenant: str, pack: tuple[tuple[str, str, str], ...] = PACK, version: int = 1) -> list[Any]:
    return [
        compile_rule(Rule(id=rid, tenant=tenant, name=rid, expression=expr, language=lang, version=version))  # type: ignore[arg-type]
        for rid, lang, expr in pack
    ]


def _flat(findings: list[Findings]) -> list[tuple[str, str, int, str, tuple[str, ...], str]]:
    return sorted(
        (f.tenant, r.id, r.version, v.trace_id, v.span_ids, v.message) for f in findings for r, v in f.found
    )


def _run(compiled: Any, table: pa.Table) -> list[Violation]:
    return list(compiled.evaluate(table))


def _generated(tenants: tuple[str, ...], spans: int, seed: int) -> pa.Table:
    from betrace.streams.otlp import OtlpDecoder, Record
    from betrace.workload.otlp import batch_messages

    gen = TraceGenerator(tenants=tenants, violation_rate=0.3, seed=seed)
    decoder = OtlpDecoder(encoding="otlp_proto", tenant_header="X-Scope-OrgID", default_tenant="default")
    records = [
        Record(m.value, m.key, [("X-Scope-OrgID", m.tenant.encode())], timestamp_ms=1)
        for m in batch_messages(gen.traces(spans))
    ]
    return decoder.decode(records).spans


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_shared_evaluation_equalsevaluate_per_tenant_evaluation(seed: int) -> None:
    tenants = ("a", "b", "c", "d")
    table = _generated(tenants, 3_000, seed)
    # a, b, c share the pack (c with other rule versions); d runs only part of it, plus its own rule.
    rules = {
        "a": _rules("a"),
        "b": _rules("b"),
        "c": _rules("c", version=3),
        "d": _rules("d", (*PACK[:2], ("mine", "traceql", '{ name = "audit.log" }'))),
    }
    shared = evaluate_batch(table, rules.__getitem__, _run)
    alone = evaluate_per_tenant(table, rules.__getitem__, _run)
    assert _flat(shared) == _flat(alone)
    assert {f.tenant for f in shared} == set(tenants)  # violations of every tenant were planted
    assert any(r.id == "mine" for f in shared for r, _ in f.found)
    assert {r.version for f in shared if f.tenant == "c" for r, _ in f.found} == {3}


def test_a_trace_id_under_two_tenants_falls_back_toevaluate_per_tenant_evaluation() -> None:
    # The same trace id in two tenants: pii.access in one, audit.log in the other. Judged
    # together the trace would pass; each tenant's own trace must be judged alone.
    a = make_table({"t1": [{"name": "pii.access"}]}, tenant="a")
    b = make_table({"t1": [{"name": "audit.log"}]}, tenant="b")
    table = pa.concat_tables([a, b])
    assert not trace_ids_unique_per_tenant(table)
    rules = {"a": _rules("a", PACK[:1]), "b": _rules("b", PACK[:1])}
    found = _flat(evaluate_batch(table, rules.__getitem__, _run))
    assert [(t, rid, trace) for t, rid, _, trace, _, _ in found] == [("a", "pii", "t1")]


class _Counter:
    def __init__(self) -> None:
        self.ok: list[str] = []

    def success(self, rule: Rule) -> None:
        self.ok.append(rule.tenant)


def test_a_failing_shared_program_is_rerunevaluate_per_tenant_and_successes_are_counted() -> None:
    table = pa.concat_tables(
        [
            make_table({"x1": [{"name": "pii.access"}]}, tenant="a"),
            make_table({"y1": [{"name": "pii.access"}]}, tenant="b"),
        ]
    )
    rules = {"a": _rules("a", PACK[:1]), "b": _rules("b", PACK[:1])}
    calls: list[str] = []

    def run_one(compiled: Any, sub: pa.Table) -> list[Violation]:
        calls.append(compiled.rule.tenant)
        return list(compiled.evaluate(sub))

    counter = _Counter()
    found = evaluate_batch(table, rules.__getitem__, run_one, counter)
    assert calls == []  # one shared evaluation, not the per-tenant path
    assert sorted(counter.ok) == ["a", "b"]
    assert [(f.tenant, [v.trace_id for _, v in f.found]) for f in found] == [("a", ["x1"]), ("b", ["y1"])]

    class Broken:
        def __init__(self, inner: Any) -> None:
            self.inner = inner
            self.rule = inner.rule

        def evaluate(self, sub: pa.Table) -> list[Violation]:
            if sub.num_rows > 1:
                msg = "boom on the shared table"
                raise RuntimeError(msg)
            return list(self.inner.evaluate(sub))

    broken = {t: [Broken(c) for c in rs] for t, rs in rules.items()}
    found = evaluate_batch(table, broken.__getitem__, run_one)
    assert sorted(calls) == ["a", "b"]  # each tenant's rule charged (and run) on its own
    assert [(f.tenant, [v.trace_id for _, v in f.found]) for f in found] == [("a", ["x1"]), ("b", ["y1"])]
