"""Attribute extraction strategies give the same verdicts as one full pass.

Keys read only under a span name are extracted from those spans alone; the
values must be exact there, whatever other rules of the tenant (or of other
tenants evaluating the same table) read.
"""

from __future__ import annotations

import itertools

import pyarrow as pa
import pytest
from rules_spans import make_table

from betrace.rules.batch import BatchContext, context_for
from betrace.rules.engine import compile_rule
from betrace.rules.model import Rule

SPANS = {
    "a" * 32: [
        {"name": "charge", "attrs": {"amount": 1500, "tags": ["x", "vip"], "note": 'say "hi"'}},
        {"name": "other", "attrs": {"amount": 5, "note": "plain"}},
        {"name": "receipt"},
    ],
    "b" * 32: [
        {"name": "charge", "attrs": {"amount": "2000", "tags": [], "note": None}},
        {"name": "other", "attrs": {"amount": 3000, "tags": ["vip"]}},
    ],
    "c" * 32: [
        {"name": "charge", "attrs": {"amount": 10}},
        {"name": "other", "attrs": {"amount": 9000, "note": 'say "hi"'}},
        {"name": "charge", "attrs": {"amount": 1001.5, "tags": ["vip"]}},
    ],
}
SCOPED = [
    "when { charge.where(amount > 1000) } always { receipt }",
    'when { charge.where(tags contains "vip") } always { receipt }',
    'when { charge.where(note = "say \\"hi\\"") } always { receipt }',
    "when { charge.where(note = nil) } always { receipt }",
    "when { charge.where(amount != 10) } always { receipt }",
    "when { other.where(amount > 1000) } always { receipt }",
]
UNSCOPED = [
    ("traceql", "{ span.amount > 1000 }"),
    ("traceql", '{ span.tags = "vip" }'),
]


def verdicts(rules: list[Rule], table: pa.Table) -> dict[str, list[str]]:
    compiled = [compile_rule(rule) for rule in rules]
    return {c.rule.id: sorted(v.trace_id for v in c.evaluate(table)) for c in compiled}


def rules_of(tenant: str, sources: list[tuple[str, str]], prefix: str = "") -> list[Rule]:
    return [
        Rule(id=f"{prefix}{tenant}-{i}", tenant=tenant, name="r", expression=e, language=lang)  # type: ignore[arg-type]
        for i, (lang, e) in enumerate(sources)
    ]


def expected(rule: Rule) -> list[str]:
    """Each rule alone, on its own fresh table: the reference verdict."""
    return verdicts([rule], make_table(SPANS))[rule.id]


@pytest.mark.parametrize("mix", ["scoped-only", "with-unscoped", "other-tenant-unscoped"])
def test_scoped_and_full_extraction_agree(mix: str) -> None:
    scoped = rules_of("t1", [("betrace", e) for e in SCOPED])
    rules = list(scoped)
    if mix == "with-unscoped":
        rules += rules_of("t1", UNSCOPED, prefix="u")
    elif mix == "other-tenant-unscoped":
        rules += rules_of("t2", UNSCOPED)
    reference = {rule.id: expected(rule) for rule in rules}
    for order in (rules, list(reversed(rules))):
        assert verdicts(order, make_table(SPANS)) == reference


def test_scoped_keys_are_extracted_from_the_named_spans_only() -> None:
    rules = [compile_rule(r) for r in rules_of("scoped", [("betrace", e) for e in SCOPED[:2]])]
    table = make_table(SPANS)
    ctx = context_for(table)
    rules[0].evaluate(table)
    raw = ctx._raw["span", "amount"]
    assert raw.rows == frozenset({"charge"})
    assert len(raw.values) == 4  # the four charge spans, not all eight
    # A later unscoped read widens the extraction instead of reusing the narrow one.
    assert ctx.attribute("span", "amount").num.to_pylist() == [1500, 5, None, None, 3000, 10, 9000, 1001.5]


def test_attribute_for_another_name_reextracts() -> None:
    ctx = BatchContext(make_table(SPANS))
    charge = ctx.attribute("span", "amount", "charge")
    assert charge.num is not None
    other = ctx.attribute("span", "amount", "other")
    names = ctx.column("name").to_pylist()
    values = other.num.to_pylist() if other.num is not None else []
    for name, value, full in zip(names, values, [1500, 5, None, None, 3000, 10, 9000, 1001.5], strict=True):
        if name in ("charge", "other"):
            assert value == full


@pytest.mark.parametrize(("a", "b"), list(itertools.permutations(range(3), 2)))
def test_rule_order_does_not_matter(a: int, b: int) -> None:
    rules = rules_of("order", [("betrace", SCOPED[a]), ("betrace", SCOPED[b])])
    assert verdicts(rules, make_table(SPANS)) == {r.id: expected(r) for r in rules}
