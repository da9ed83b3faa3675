"""Judging many tenants' windows with shared rule programs gives the per-tenant summaries."""

from __future__ import annotations

from dataclasses import replace

import pyarrow as pa
import pyarrow.compute as pc
from tests.unit.agents.test_assembly_windows import spans

from betrace.agents.assembly import summary as sm
from betrace.agents.assembly.shared import fold_tenants, sequence_deadlines
from betrace.agents.assembly.state import OpenTrace, piece
from betrace.rules.engine import CompiledSequenceRule, compile_rule
from betrace.rules.model import CompiledRule, Rule

PACK = [
    Rule(id="pii", tenant="-", name="pii audited", expression="when { pii.access } always { audit.log }"),
    Rule(
        id="db",
        tenant="-",
        name="db budget",
        expression="when { http.request } never { count(db.query) > 2 }",
    ),
    Rule(id="tq", tenant="-", name="errors", language="traceql", expression='{ name = "boom" }'),
    Rule(
        id="agg",
        tenant="-",
        name="db spans",
        language="traceql",
        expression='{ name = "db.query" } | count() > 4',
    ),
    Rule(
        id="seq",
        tenant="-",
        name="pii then audit",
        language="sequence",
        expression="pii.access followed_by audit.log within 5ns",
    ),
    Rule(
        id="tree",
        tenant="-",
        name="boom in a pii trace",
        language="traceql",
        expression='{ name = "boom" } && { name = "pii.access" }',
    ),
    Rule(
        id="tree-agg",
        tenant="-",
        name="slow db per name",
        language="traceql",
        expression='({ name = "db.query" } && { name = "http.request" }) | by(name) | avg(duration) > 0',
    ),
]


def rules(tenant: str, *, version: int = 1, extra: bool = False) -> list[CompiledRule]:
    pack = [replace(r, tenant=tenant, version=version) for r in PACK]
    if extra:  # the same program twice under two ids, and one program nobody else runs
        pack.append(replace(PACK[0], tenant=tenant, id="pii-copy"))
        pack.append(
            Rule(id="own", tenant=tenant, name="own", expression="when { audit.log } always { pii.access }")
        )
    return [compile_rule(r) for r in pack]


RULES = {"a": rules("a"), "b": rules("b", version=3), "c": rules("c", extra=True)}

TRACES = {
    ("a", "1" * 32): ["pii.access", "http.request", "db.query", "db.query", "db.query", "boom"],
    ("a", "2" * 32): ["pii.access", "audit.log"],
    ("b", "3" * 32): ["pii.access", "x"],
    ("b", "4" * 32): ["http.request", "db.query"],
    ("c", "5" * 32): ["audit.log", "boom", "pii.access"],
    ("c", "6" * 32): ["pii.access"],
}


def windows(window: int) -> tuple[pa.Table, pa.Array]:
    parts = [
        sm.window_table(spans(trace, names, tenant=tenant), f"{trace}{sm.WINDOW_SEP}{window}")
        for (tenant, trace), names in TRACES.items()
    ]
    table = pa.concat_tables(parts)
    return table, pa.repeat(pa.scalar(True), table.num_rows)


def per_tenant(table: pa.Table, new: pa.Array, into: dict[str, sm.Summaries]) -> None:
    for tenant, compiled in RULES.items():
        mask = pc.equal(table.column("tenant"), tenant)
        sm.fold_windows(compiled, table.filter(mask), pc.filter(new, mask), into)


def test_shared_programs_fold_exactly_like_per_tenant_over_two_windows() -> None:
    expected: dict[str, sm.Summaries] = {}
    shared: dict[str, sm.Summaries] = {}
    for window in (1, 2):  # the second pass adds to the summaries of the first
        table, new = windows(window)
        per_tenant(table, new, expected)
        fold_tenants(RULES.__getitem__, table, new, shared)
    assert shared == expected
    # Each tenant's own rule versions, nobody else's (a TraceQL filter keeps only violations,
    # an aggregate query its running totals, a sequence rule its pending A spans).
    assert set(shared["3" * 32]) == {"pii@3", "db@3", "agg@3", "seq@3", "tree@3"}
    assert shared["1" * 32]["tree-agg@1"].violated  # values and groups merged over both passes
    assert shared["4" * 32]["tree-agg@3"].violated
    assert "tree-agg@1" not in shared["2" * 32]  # neither filter passed: nothing kept
    assert sm.violated(RULES["a"][4], shared["1" * 32]["seq@1"])
    assert not sm.violated(RULES["a"][4], shared["2" * 32]["seq@1"])
    # Three db.query spans per pass: over the two passes, the aggregate query matches.
    assert shared["1" * 32]["agg@1"].agg == [6, 0, 0.0, None, None]
    assert sm.violated(RULES["a"][3], shared["1" * 32]["agg@1"])
    assert not sm.violated(RULES["b"][3], shared["4" * 32]["agg@3"])
    assert set(shared["5" * 32]) >= {"pii@1", "pii-copy@1", "own@1"}
    assert shared["1" * 32]["tq@1"].violated
    # A structural query keeps the spans its filters pass (2 per pass) and is judged over them.
    tree = shared["1" * 32]["tree@1"]
    assert tree.violated and tree.tree is not None and tree.tree.spans == 4
    assert not shared["3" * 32]["tree@3"].violated
    assert not any(s.violated for s in shared["2" * 32].values())


def test_a_trace_id_under_two_tenants_falls_back_to_per_tenant() -> None:
    table, new = windows(1)
    clash = sm.window_table(spans("1" * 32, ["pii.access"], tenant="b"), f"{'1' * 32}{sm.WINDOW_SEP}1")
    table = pa.concat_tables([table, clash])
    new = pa.repeat(pa.scalar(True), table.num_rows)
    expected: dict[str, sm.Summaries] = {}
    shared: dict[str, sm.Summaries] = {}
    per_tenant(table, new, expected)
    fold_tenants(RULES.__getitem__, table, new, shared)
    assert shared == expected
    assert "pii@3" in shared["1" * 32]  # tenant b's rule saw its own span of that id


def _seq(tenant: str, rule_id: str, expression: str, version: int = 1) -> CompiledSequenceRule:
    compiled = compile_rule(
        Rule(
            id=rule_id,
            tenant=tenant,
            name=rule_id,
            language="sequence",
            expression=expression,
            version=version,
        )
    )
    assert isinstance(compiled, CompiledSequenceRule)
    return compiled


def test_sequence_deadlines_once_per_program_equal_per_tenant() -> None:
    """Tenants share a program, one has a second version, one has another program only."""
    audit, fraud = "pii.access followed_by audit.log within 30ns", "charge followed_by check within 5ns"
    rules = {
        "a": [_seq("a", "audit", audit)],
        "b": [_seq("b", "audit", audit, version=2), _seq("b", "audit-v3", audit, version=3)],
        "c": [_seq("c", "fraud", fraud)],
    }
    shapes = {
        ("a", "1" * 32): ["x", "pii.access", "pii.access"],
        ("a", "2" * 32): ["pii.access", "audit.log"],
        ("b", "3" * 32): ["pii.access", "charge"],
        ("c", "4" * 32): ["pii.access", "charge", "x"],
        ("c", "5" * 32): ["charge", "check"],
    }
    traces = [
        OpenTrace(trace_id, tenant, 0, 0.0, 0.0, chunks=[piece(t)], rows=t.num_rows)
        for (tenant, trace_id), names in shapes.items()
        for t in [spans(trace_id, names, tenant=tenant, start=100)]
    ]
    together = sequence_deadlines(rules, traces)
    alone: dict[str, int] = {}
    for tenant, compiled in rules.items():
        alone |= sequence_deadlines({tenant: compiled}, [t for t in traces if t.tenant == tenant])
    assert together == alone
    # The first unmatched A span ends at 101 + its index (as built), its deadline ``within`` later.
    assert together == {"1" * 32: 132, "2" * 32: 0, "3" * 32: 131, "4" * 32: 107, "5" * 32: 0}
    assert sequence_deadlines(rules, []) == {}
