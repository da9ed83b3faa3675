"""Engine behaviour beyond single verdicts: batches, deadlines, explain, robustness."""

from __future__ import annotations

import pyarrow as pa
import pytest
from rules_spans import BASE_NS, make_table

from betrace.rules.engine import CompiledSequenceRule, compile_rule
from betrace.rules.explain import explain
from betrace.rules.model import Rule, Verdict

MS = 1_000_000


def _rule(expression: str, language: str = "betrace", tenant: str = "t1") -> Rule:
    return Rule(id="r1", tenant=tenant, name="r", expression=expression, language=language)  # type: ignore[arg-type]


def test_many_traces_one_batch_no_leak() -> None:
    traces = {}
    for i in range(300):
        spans = [{"name": "pii.access", "id": f"a{i}"}]
        if i % 3 == 0:
            spans.append({"name": "audit.log", "id": f"b{i}"})
        traces[f"trace{i:04d}"] = spans
    # Same span ids in different traces must not link either.
    traces["dup1"] = [{"name": "pii.access", "id": "x"}]
    traces["dup2"] = [{"name": "audit.log", "id": "x"}]
    table = make_table(traces)
    violations = compile_rule(_rule("when { pii.access } always { audit.log }")).evaluate(table)
    flagged = {v.trace_id for v in violations}
    expected = {f"trace{i:04d}" for i in range(300) if i % 3} | {"dup1"}
    assert flagged == expected
    assert all(v.span_ids == (f"a{int(v.trace_id[5:])}",) for v in violations if v.trace_id != "dup1")


def test_structural_ops_do_not_cross_traces() -> None:
    # Same span ids in two traces: parent links must stay within a trace.
    table = make_table(
        {
            "t1": [{"name": "parent", "id": "p"}, {"name": "other", "id": "c", "parent": "p"}],
            "t2": [{"name": "x", "id": "p"}, {"name": "child", "id": "c", "parent": "p"}],
        }
    )
    rule = compile_rule(_rule('{ name = "parent" } >> { name = "child" }', "traceql"))
    assert rule.evaluate(table) == []


def test_chunked_table_and_reordered_rows() -> None:
    table = make_table({"a": [{"name": "pii.access", "id": "1"}], "b": [{"name": "audit.log", "id": "2"}]})
    chunked = pa.concat_tables([table.slice(1), table.slice(0, 1)])
    violations = compile_rule(_rule("when { pii.access } always { audit.log }")).evaluate(chunked)
    assert [v.trace_id for v in violations] == ["a"]


def test_empty_table() -> None:
    table = make_table({})
    for expression, language in [
        ("when { a } always { b }", "betrace"),
        ("{ }", "traceql"),
        ("a followed_by b within 1s", "sequence"),
    ]:
        assert compile_rule(_rule(expression, language)).evaluate(table) == []


def test_evaluate_single_positional_argument_for_all_languages() -> None:
    table = make_table({"t": [{"name": "a", "id": "1"}]})
    for expression, language in [
        ("when { a } always { b }", "betrace"),
        ('{ name = "a" }', "traceql"),
        ("a followed_by b within 1s", "sequence"),
    ]:
        assert len(compile_rule(_rule(expression, language)).evaluate(table)) == 1


def test_sequence_deadlines_and_pending() -> None:
    table = make_table(
        {
            "late": [{"name": "pii.access", "id": "a", "start": 0, "dur": 10}],
            "two": [
                {"name": "pii.access", "id": "a1", "start": 0, "dur": 10},
                {"name": "pii.access", "id": "a2", "start": 5000, "dur": 10},
            ],
            "ok": [
                {"name": "pii.access", "id": "a", "start": 0, "dur": 10},
                {"name": "audit.log", "id": "b", "start": 20},
            ],
        }
    )
    compiled = compile_rule(_rule("pii.access followed_by audit.log within 30s", "sequence"))
    assert isinstance(compiled, CompiledSequenceRule)
    deadlines = compiled.deadline_ns(table)
    assert deadlines == {"late": BASE_NS + 30_010 * MS, "two": BASE_NS + 30_010 * MS}
    now = BASE_NS + 31_000 * MS
    assert {v.trace_id for v in compiled.evaluate(table, now_ns=now)} == {"late", "two"}
    two = next(v for v in compiled.evaluate(table, now_ns=now) if v.trace_id == "two")
    assert two.span_ids == ("a1",)  # a2 is still pending
    early = BASE_NS + 1_000 * MS
    assert compiled.evaluate(table, now_ns=early) == []
    assert compiled.verdicts(table, now_ns=early) == {
        "late": Verdict.PENDING,
        "two": Verdict.PENDING,
        "ok": Verdict.PASS,
    }
    assert compiled.verdicts(table)["late"] is Verdict.VIOLATION


def test_explain_dsl() -> None:
    table = make_table(
        {
            "bad": [{"name": "payment.charge_card", "id": "p", "attrs": {"amount": 5000}}],
            "good": [
                {"name": "payment.charge_card", "id": "p", "attrs": {"amount": 5000}},
                {"name": "payment.fraud_check", "id": "f"},
            ],
        }
    )
    text = explain(
        _rule("when { payment.charge_card.where(amount > 1000) } always { payment.fraud_check }"),
        table,
    )
    assert "trace bad: VIOLATION" in text
    assert "trace good: PASS" in text
    assert "when { payment.charge_card.where(amount > 1000) }: holds [payment.charge_card#p]" in text
    assert "always { payment.fraud_check }: does not hold" in text


def test_explain_traceql_and_sequence() -> None:
    table = make_table({"t": [{"name": "a", "id": "1", "status": "error"}]})
    assert "matched: a#1" in explain(_rule("{ status = error }", "traceql"), table)
    text = explain(_rule("a followed_by b within 1s", "sequence"), table, now_ns=BASE_NS)
    assert "trace t: PENDING" in text
    assert "not followed in time: a#1" in text


def test_attribute_edge_cases() -> None:
    table = make_table(
        {
            "t": [
                {"name": "s", "id": "1", "attrs": {"Key": "upper", "key": "lower"}},
                {"name": "s", "id": "2", "attrs": {"k'q": "quote", "uni": "caf\u00e9 \u2603"}},
                {"name": "s", "id": "3", "attrs": {"nested": {"a": 1}, "n": None}},
            ]
        }
    )

    def spans(expression: str) -> tuple[str, ...]:
        found = compile_rule(_rule(expression, "traceql")).evaluate(table)
        return found[0].span_ids if found else ()

    assert spans('{ span.Key = "upper" }') == ("1",)
    assert spans('{ span.key = "lower" }') == ("1",)
    assert spans('{ span.key = "upper" }') == ()
    assert spans('{ span."k\'q" = "quote" }') == ("2",)
    assert spans('{ span.uni = "caf\u00e9 \u2603" }') == ("2",)
    assert spans("{ span.n = nil }") == ("1", "2", "3")
    assert spans("{ span.nested != nil }") == ("3",)


def test_invalid_attribute_json_is_skipped() -> None:
    table = make_table({"t": [{"name": "s", "id": "1", "attrs": {"a": 1}}, {"name": "s", "id": "2"}]})
    attributes = pa.array(['{"a": 1}', "{not json"])
    table = table.set_column(table.schema.get_field_index("attributes"), "attributes", attributes)
    found = compile_rule(_rule("{ span.a = 1 }", "traceql")).evaluate(table)
    assert found[0].span_ids == ("1",)


@pytest.mark.parametrize("tenant", ["t1", "other"])
def test_rules_of_one_tenant_share_extraction(tenant: str) -> None:
    rules = [
        compile_rule(_rule("{ span.alpha = 1 }", "traceql", tenant)),
        compile_rule(_rule("{ span.beta = 2 }", "traceql", tenant)),
    ]
    table = make_table({"t": [{"name": "s", "id": "1", "attrs": {"alpha": 1, "beta": 2}}]})
    assert all(len(rule.evaluate(table)) == 1 for rule in rules)
