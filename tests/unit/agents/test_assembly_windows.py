"""Windowed assembly: exact DSL verdicts across windows, limits, late spans, replay, state."""

from __future__ import annotations

import itertools
import random

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from betrace.agents.assembly import assembler as asm_mod
from betrace.agents.assembly.assembler import DECISIONS_TABLE, TRACES_TABLE, ClosedTraces, TraceAssembler
from betrace.config.settings import AssemblyPolicy
from betrace.metrics import InMemoryHooks
from betrace.rules.engine import compile_rule
from betrace.rules.model import CompiledRule, Rule
from betrace.streams.schemas import SPAN_SCHEMA

T1, T2, T3 = ("a" * 32, "b" * 32, "c" * 32)
RULES = [
    Rule(id="pii", tenant="t", name="pii audited", expression="when { pii.access } always { audit.log }"),
    Rule(
        id="many-db",
        tenant="t",
        name="db budget",
        expression="when { http.request } never { count(db.query) > 150 }",
    ),
    Rule(id="tq", tenant="t", name="errors", language="traceql", expression='{ name = "boom" }'),
]
COMPILED: list[CompiledRule] = [compile_rule(r) for r in RULES]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def spans(trace: str, names: list[str], *, start: int = 0, tenant: str = "t") -> pa.Table:
    n = len(names)
    return pa.table(
        {
            "tenant": [tenant] * n,
            "trace_id": [trace] * n,
            "span_id": [f"{start + i + 1:016x}" for i in range(n)],
            "parent_span_id": [None] * n,
            "name": names,
            "service": ["svc"] * n,
            "kind": [1] * n,
            "status_code": [0] * n,
            "start_ns": [start + i for i in range(n)],
            "end_ns": [start + i + 1 for i in range(n)],
            "attributes": ["{}"] * n,
            "resource_attributes": ["{}"] * n,
            "produced_ms": [5] * n,
        },
        schema=SPAN_SCHEMA,
    )


def with_column(table: pa.Table, name: str, values: object) -> pa.Table:
    """``table`` with column ``name`` replaced by ``values``."""
    return table.set_column(table.schema.get_field_index(name), name, values)


def numbered_rules(prefix: str, expressions: list[str], language: str = "traceql") -> list[CompiledRule]:
    return [
        compile_rule(Rule(id=f"{prefix}{i}", tenant="t", name=q, language=language, expression=q))
        for i, q in enumerate(expressions)
    ]


def make(
    clock: Clock, hooks: InMemoryHooks, *, rules: list[CompiledRule] = COMPILED, **overrides: float
) -> TraceAssembler:
    values: dict[str, float] = {
        "idle_timeout_s": 5.0,
        "max_trace_age_s": 3600.0,
        "window_spans": 10,
        "window_overlap_pct": 20.0,
        "max_live_traces": 1000,
        "max_trace_bytes": 10**9,
        "decision_cache_s": 60.0,
        "root_close_delay_s": 0.0,
    }
    values.update(overrides)
    policy = AssemblyPolicy(
        idle_timeout_s=values["idle_timeout_s"],
        max_trace_age_s=values["max_trace_age_s"],
        window_spans=int(values["window_spans"]),
        window_overlap_pct=values["window_overlap_pct"],
        max_live_traces=int(values["max_live_traces"]),
        max_trace_bytes=int(values["max_trace_bytes"]),
        decision_cache_s=values["decision_cache_s"],
        root_close_delay_s=values["root_close_delay_s"],
    )
    return TraceAssembler(
        idle_timeout_s=policy.idle_timeout_s,
        max_trace_age_s=policy.max_trace_age_s,
        max_live_traces=10_000,
        hooks=hooks,
        clock=clock,
        policy=lambda _t: policy,
        rules_for=lambda t: rules if t == "t" else [],
        checkpoint_interval_s=1.0,
        decision_cache_max=1000,
        partitions=4,
    )


def tick(asm: TraceAssembler, clock: Clock, advance: float = 0.0) -> ClosedTraces:
    clock.now += advance
    out = asm.close_due()
    return out if out is not None else ClosedTraces(spans=SPAN_SCHEMA.empty_table(), traces=0, released=[])


def rules_of(out: ClosedTraces) -> set[tuple[str, str]]:
    return {(d["rule_id"], d["trace_id"]) for d in out.signals}


def test_border_crossing_dsl_rule_is_exact_over_many_windows() -> None:
    clock, hooks = Clock(), InMemoryHooks()
    asm = make(clock, hooks)
    # pii.access in the first window, its audit.log 95 spans later: many windows apart.
    names = ["pii.access", *(["noise"] * 95), "audit.log"]
    for i in range(0, len(names), 7):
        asm.add(spans(T1, names[i : i + 7], start=i), seq=i, offset=i)
        tick(asm, clock, 0.1)
    # T2 misses the audit and crosses windows too: a windowed violation, not forwarded.
    asm.add(spans(T2, ["pii.access", *(["noise"] * 30)]), seq=500, offset=500)
    tick(asm, clock, 0.1)  # its windows are folded before it closes
    out = tick(asm, clock, 10)
    assert out.traces == 2
    assert rules_of(out) == {("pii", T2)}
    assert out.spans.num_rows == 0  # both were judged from summaries
    assert hooks.total("betrace_windows_evaluated_total") >= 10


def test_counts_across_windows_count_each_span_once() -> None:
    clock, hooks = Clock(), InMemoryHooks()
    asm = make(clock, hooks)
    # 150 db.query spans: not more than 150 although overlaps repeat rows in windows.
    asm.add(spans(T1, ["http.request", *(["db.query"] * 150)]), seq=1, offset=1)
    tick(asm, clock)
    out = tick(asm, clock, 10)
    assert rules_of(out) == set()
    asm.add(spans(T2, ["http.request", *(["db.query"] * 151)]), seq=2, offset=2)
    tick(asm, clock)
    assert rules_of(tick(asm, clock, 10)) == {("many-db", T2)}


def test_small_trace_is_forwarded_whole_and_remembered() -> None:
    clock, hooks = Clock(), InMemoryHooks()
    asm = make(clock, hooks)
    asm.add(spans(T1, ["pii.access", "audit.log"]), seq=1, offset=7)
    out = tick(asm, clock, 6)
    assert out.spans.num_rows == 2 and not out.signals  # the evaluate stage judges it
    assert out.released == [1]
    assert [(w.table, w.key) for w in out.writes] == [(DECISIONS_TABLE, T1)]
    assert asm.decisions == 1


def test_late_span_emits_only_on_pass_to_violation_and_never_twice() -> None:
    clock, hooks = Clock(), InMemoryHooks()
    asm = make(clock, hooks)
    asm.add(spans(T1, ["http.request"]), seq=1, offset=1)
    tick(asm, clock, 6)  # closed: pass
    asm.add(spans(T1, ["pii.access"], start=10), seq=2, offset=2)
    out = tick(asm, clock, 2)
    assert rules_of(out) == {("pii", T1)}
    assert out.released == [2]
    assert hooks.total("betrace_late_spans_total") == 1
    assert hooks.observations[("betrace_late_span_age_seconds", (("stage", "assemble"),))] == [2.0]
    asm.add(spans(T1, ["pii.access"], start=20), seq=3, offset=3)
    assert tick(asm, clock, 1).signals == []  # still a violation: no duplicate
    asm.add(spans(T1, ["audit.log"], start=30), seq=4, offset=4)
    assert tick(asm, clock, 1).signals == []  # violation to pass: no retraction, no signal


def test_a_remembered_decision_keeps_only_its_json_and_loses_no_change() -> None:
    import orjson

    from betrace.agents.assembly.state import Decision, decode_decision
    from betrace.agents.assembly.summary import RuleSummary

    decision = Decision(
        "t", 0, 1.0, 5, 1, {"pii@1": RuleSummary(counts=[1, 0], evidence=["a"]), "x@1": RuleSummary()}
    )
    record = decision.encode()
    # Fields at their defaults are left out of the record; the reader fills them in.
    assert orjson.loads(record)["summaries"] == {"pii@1": {"c": [1, 0], "e": ["a"]}, "x@1": {}}
    decision.compact()
    assert decision.summaries == decode_decision(0, record).summaries
    decision.compact()
    decision.summaries_to_change()["pii@1"].counts = [1, 1]  # a late audit.log, not encoded yet
    decision.compact()
    assert decision.summaries["pii@1"].counts == [1, 1]
    assert decode_decision(0, decision.encode()).summaries["pii@1"] == RuleSummary(
        counts=[1, 1], evidence=["a"]
    )


def test_replayed_rows_are_skipped_by_offset() -> None:
    clock, hooks = Clock(), InMemoryHooks()
    asm = make(clock, hooks)
    asm.add(spans(T1, ["http.request", *(["db.query"] * 100)]), seq=1, offset=1)
    tick(asm, clock)  # folds windows and checkpoints
    asm.add(spans(T1, ["http.request", *(["db.query"] * 100)]), seq=2, offset=1)  # replay
    assert hooks.total("betrace_replayed_spans_skipped_total") == 101
    out = tick(asm, clock, 10)
    assert rules_of(out) == set()  # 100 db.query, not 200


def test_checkpoint_and_restore_continue_the_trace_exactly() -> None:
    clock, hooks = Clock(), InMemoryHooks()
    asm = make(clock, hooks)
    asm.add(spans(T1, ["pii.access", *(["noise"] * 30)]), seq=1, offset=3)
    first = tick(asm, clock)
    saved = {w.key: w.value for w in first.writes if w.table == TRACES_TABLE}
    assert set(saved) == {T1}
    assert first.released == [1]  # durable once the checkpoint is written
    # A new process: restore, then the replay of offset 3 is skipped and offset 4 is new.
    other = make(clock, InMemoryHooks())
    value = saved[T1]
    assert value is not None
    other.restore(TRACES_TABLE, T1, value)
    other.add(spans(T1, ["pii.access", *(["noise"] * 30)]), seq=10, offset=3)
    other.add(spans(T1, ["audit.log"], start=100), seq=11, offset=4)
    out = tick(other, clock, 10)
    assert rules_of(out) == set()
    assert out.traces == 1
    assert (TRACES_TABLE, T1, None) in {(w.table, w.key, w.value) for w in out.writes}


def test_tenant_live_limit_closes_oldest_early_and_says_why() -> None:
    clock, hooks = Clock(), InMemoryHooks()
    asm = make(clock, hooks, max_live_traces=2)
    for seq, trace in enumerate((T1, T2, T3)):
        asm.add(spans(trace, ["x"]), seq=seq, offset=seq)
        clock.now += 0.1
    out = tick(asm, clock)
    assert out.traces == 1 and out.spans.column("trace_id").to_pylist() == [T1]
    assert hooks.total("betrace_assembly_limit_total", reason="tenant_live_limit") == 1


def test_byte_limit_evaluates_early_then_drops_later_spans_with_a_reason() -> None:
    clock, hooks = Clock(), InMemoryHooks()
    asm = make(clock, hooks, max_trace_bytes=2048)
    asm.add(spans(T1, ["pii.access", *(["noise"] * 40)]), seq=1, offset=1)
    out = tick(asm, clock)
    assert out.traces == 1 and rules_of(out) == {("pii", T1)}
    assert hooks.total("betrace_assembly_limit_total", reason="bytes_limit") == 1
    asm.add(spans(T1, ["audit.log"], start=99), seq=2, offset=2)
    out = tick(asm, clock)
    assert [(d.reason, d.spans.num_rows) for d in out.dropped] == [("trace_bytes_limit", 1)]
    assert hooks.total("betrace_spans_dropped_total", reason="bytes_limit") == 1
    assert out.released == [2]


def test_memory_per_trace_stays_within_one_window() -> None:
    clock, hooks = Clock(), InMemoryHooks()
    asm = make(clock, hooks, window_spans=100)
    for i in range(50):
        asm.add(spans(T1, ["noise"] * 200, start=i * 200), seq=i, offset=i)
        tick(asm, clock, 0.01)
        assert asm.held_bytes() < 100 * 1024
    assert asm.live_traces == 1


def test_traceql_rule_matches_in_any_window() -> None:
    clock, hooks = Clock(), InMemoryHooks()
    asm = make(clock, hooks)
    asm.add(spans(T1, [*(["noise"] * 45), "boom", *(["noise"] * 20)]), seq=1, offset=1)
    tick(asm, clock)
    assert rules_of(tick(asm, clock, 10)) == {("tq", T1)}


def test_drop_partitions_forgets_state_and_held_messages() -> None:
    clock, hooks = Clock(), InMemoryHooks()
    asm = make(clock, hooks)
    asm.add(spans(T1, ["x"]), seq=1, partition=2, offset=1)
    assert asm.drop_partitions({2}) == [1]
    assert asm.live_traces == 0
    assert asm_mod.TRACES_TABLE == TRACES_TABLE


AGGREGATE_QUERIES = [
    '{ name = "db" } | count() > 40',
    '{ name = "db" } | avg(duration) > 100ns',
    "{ } | max(duration) >= 199ns",
    '{ name = "db" } | min(duration) < 3ns',
    "{ span.http.status_code >= 500 } | sum(span.http.status_code) > 60000",
    "{ span.http.status_code >= 500 } | avg(span.http.status_code) > 501.5",
]


def long_trace(trace: str, rng: random.Random) -> pa.Table:
    n = rng.randint(120, 400)
    names = [rng.choice(["db", "http", "noise"]) for _ in range(n)]
    starts = [rng.randint(0, 10_000) for _ in range(n)]
    codes = [rng.choice([None, 200, 500, 503]) for _ in range(n)]
    table = spans(trace, names)
    durations = [rng.randint(1, 200) for _ in range(n)]
    attributes = ["{}" if c is None else f'{{"http.status_code": {c}}}' for c in codes]
    table = with_column(table, "start_ns", pa.array(starts, pa.int64()))
    ends = pa.array([s + d for s, d in zip(starts, durations, strict=True)], pa.int64())
    table = with_column(table, "end_ns", ends)
    return with_column(table, "attributes", pa.array(attributes))


def test_traceql_aggregates_over_many_windows_match_the_whole_trace() -> None:
    """Each window sees only a part, yet the verdict equals the one on the whole trace."""
    rules = numbered_rules("agg", AGGREGATE_QUERIES)
    rng = random.Random(11)
    traces = {f"{i:032x}": long_trace(f"{i:032x}", rng) for i in range(1, 25)}
    clock, hooks = Clock(), InMemoryHooks()
    asm = make(clock, hooks, rules=rules)
    seq = 0
    for table in traces.values():
        at = 0
        while at < table.num_rows:
            size = rng.randint(1, 30)
            asm.add(table.slice(at, size), seq=seq, offset=seq)
            seq, at = seq + 1, at + size
            tick(asm, clock, 0.01)
    out = tick(asm, clock, 10)
    assert out.traces == len(traces)
    assert out.spans.num_rows == 0  # every trace was judged from its summaries
    expected = set(whole_violations(rules, traces))
    assert rules_of(out) == expected
    # Not vacuous: each query matches some traces and not others.
    for c in rules:
        matched = {t for rule_id, t in expected if rule_id == c.rule.id}
        assert 0 < len(matched) < len(traces), c.rule.expression


def feed_shuffled(
    rules: list[CompiledRule], traces: dict[str, pa.Table], window_spans: int, rng: random.Random
) -> list[dict[str, object]]:
    """Every trace's spans in random order and random messages; the signals of all closes."""
    clock, hooks = Clock(), InMemoryHooks()
    asm = make(clock, hooks, rules=rules, window_spans=window_spans)
    seq, closed, signals = 0, 0, []
    for table in traces.values():
        shuffled = table.take(pa.array(rng.sample(range(table.num_rows), table.num_rows)))
        at = 0
        while at < shuffled.num_rows:
            size = rng.randint(1, 30)
            asm.add(shuffled.slice(at, size), seq=seq, offset=seq)
            seq, at = seq + 1, at + size
            out = tick(asm, clock, 0.01)
            closed, signals = closed + out.traces, signals + out.signals
            assert out.spans.num_rows == 0  # every trace was judged from its summaries
    out = tick(asm, clock, 10)
    assert closed + out.traces == len(traces)
    return signals + out.signals


def whole_violations(
    rules: list[CompiledRule], traces: dict[str, pa.Table]
) -> dict[tuple[str, str], set[str]]:
    """The reference: each rule over each whole trace, (rule, trace) -> cited spans."""
    return {
        (c.rule.id, v.trace_id): set(v.span_ids)
        for c in rules
        for table in traces.values()
        for v in c.evaluate(table)
    }


SEQUENCE_RULES = [
    "pii followed_by audit within 300ns",
    "pii followed_by audit within 40ns from start",
    "http followed_by http within 150ns",  # A and B the same kind: never a span with itself
    "{ span.http.status_code >= 500 } followed_by http within 2us",
]


def test_sequence_rules_over_many_windows_match_the_whole_trace() -> None:
    """Spans arrive shuffled and fall into windows at random, yet ``followed_by`` is exact."""
    rules = numbered_rules("seq", SEQUENCE_RULES, "sequence")
    rng = random.Random(5)
    traces: dict[str, pa.Table] = {}
    for i in range(1, 41):
        table = long_trace(f"{i:032x}", rng)
        # Per trace a mix, so that each rule passes some traces and fails others.
        weights = [rng.choice([0, 1, 3, 20]), 20, rng.choice([0, 1, 10, 40]), 40]
        names = rng.choices(["pii", "audit", "http", "noise"], weights, k=table.num_rows)
        traces[f"{i:032x}"] = with_column(table, "name", pa.array(names))
    for window_spans in (10, 37):
        signals = feed_shuffled(rules, traces, window_spans, rng)
        expected = set(whole_violations(rules, traces))
        assert {(d["rule_id"], d["trace_id"]) for d in signals} == expected, window_spans
        for c in rules:  # not vacuous: each rule passes some traces and fails others
            matched = {t for rule_id, t in expected if rule_id == c.rule.id}
            assert 0 < len(matched) < len(traces), c.rule.expression
        # The evidence is the unmatched A spans themselves.
        whole = whole_violations(rules, traces)
        for doc in signals:
            assert doc["span_ids"]
            assert set(doc["span_ids"]) <= whole[(doc["rule_id"], doc["trace_id"])]
            assert "unmatched over" in doc["message"]


def test_sequence_state_survives_its_json_form_and_caps_what_it_keeps() -> None:
    from betrace.agents.assembly import sequence as sq
    from betrace.agents.assembly.summary import RuleSummary, summaries_json

    state = sq.SeqState(cover=[[0, 10], [50, 60]], pending=[[20, "a1"], [70, "a2"]])
    doc = summaries_json({"r@1": RuleSummary(seq=state)})
    back = RuleSummary.from_json(doc["r@1"])
    assert back.seq == state
    # A later B covering 8..25 clears a1; an A at 5 is already covered.
    state.merge(sq.SeqState(cover=[[8, 25]], pending=[[5, "a3"]]))
    assert [p[1] for p in state.pending] == ["a2"]
    assert state.cover == [[0, 25], [50, 60]]
    many = sq.SeqState(pending=[[i, f"s{i}"] for i in range(sq.MAX_PENDING + 5)])
    cover = sq.SeqState(cover=[[i * 10, i * 10 + 1] for i in range(sq.MAX_COVER + 3)])
    into = sq.SeqState()
    into.merge(many)
    into.merge(cover)
    assert into.lost == 5 and len(into.pending) <= sq.MAX_PENDING and into.violated
    assert len(into.cover) == sq.MAX_COVER // 2
    assert into.joined == sq.MAX_COVER + 3 - sq.MAX_COVER // 2
    # Joining only ever widens the cover: every B interval is still covered.
    assert all(sq._covered(into.cover, lo) and sq._covered(into.cover, hi) for lo, hi in cover.cover)


def test_sequence_cover_is_the_union_of_its_intervals() -> None:
    from betrace.agents.assembly import sequence as sq

    rng = random.Random(3)
    for _ in range(200):
        intervals = [
            (lo, lo + rng.randint(0, 8)) for lo in (rng.randint(0, 100) for _ in range(rng.randint(1, 12)))
        ]
        state = sq.SeqState()
        for lo, hi in intervals:
            state.merge(sq.SeqState(cover=[[lo, hi]]))
        assert all(a[1] + 1 < b[0] for a, b in itertools.pairwise(state.cover))  # sorted, disjoint
        for t in range(-2, 112):
            assert sq._covered(state.cover, t) == any(lo <= t <= hi for lo, hi in intervals), (intervals, t)


def _at(table: pa.Table, start_ns: int) -> pa.Table:
    """``table`` with its spans moved to start at ``start_ns`` (one ns apart, as built)."""
    starts = pc.add(table.column("start_ns"), start_ns)
    ends = pc.add(table.column("end_ns"), start_ns)
    table = with_column(table, "start_ns", starts)
    return with_column(table, "end_ns", ends)


def audit_sequence_rule() -> CompiledRule:
    """``pii.access followed_by audit.log within 30s`` of tenant ``t``."""
    rule = Rule(
        id="audit",
        tenant="t",
        name="audited",
        language="sequence",
        expression="pii.access followed_by audit.log within 30s",
    )
    return compile_rule(rule)


def test_an_idle_trace_waits_for_its_followed_by_deadline_before_it_is_judged() -> None:
    """The verdict is decided when the deadline passes, not when the trace goes idle early."""
    rule = audit_sequence_rule()
    clock, hooks = Clock(), InMemoryHooks()
    asm = make(clock, hooks, rules=[rule], idle_timeout_s=5.0, window_spans=10)
    now_ns = int(clock.now * 1e9)
    late_audit, never, windowed, windowed_never = "1" * 32, "2" * 32, "3" * 32, "4" * 32
    asm.add(_at(spans(late_audit, ["pii.access", "x"]), now_ns), seq=0, offset=0)
    asm.add(_at(spans(never, ["pii.access"]), now_ns), seq=1, offset=1)
    asm.add(_at(spans(windowed, ["pii.access"] + ["x"] * 14), now_ns), seq=2, offset=2)
    asm.add(_at(spans(windowed_never, ["x"] * 8 + ["pii.access"] * 6), now_ns), seq=5, offset=5)
    tick(asm, clock)
    closed = tick(asm, clock, 6.0)  # idle, but every deadline is 24 s ahead
    assert closed.traces == 0 and asm.live_traces == 4
    assert hooks.total("betrace_traces_held_total") == 4
    # 10 s later the audit log comes: the first trace passes once idle again.
    audit = _at(spans(late_audit, ["audit.log"], start=10), now_ns + 10 * 10**9)
    asm.add(audit, seq=3, offset=3)
    asm.add(_at(spans(windowed, ["audit.log"], start=20), now_ns + 10 * 10**9), seq=4, offset=4)
    tick(asm, clock, 4.0)
    out = tick(asm, clock, 6.0)
    assert out.traces == 2 and not out.signals  # late_audit forwarded whole, windowed judged here
    assert set(out.spans.column("trace_id").to_pylist()) == {late_audit}
    out = tick(asm, clock, 10.0)  # 26 s after the pii access: still no verdict for `never`
    assert out is None or out.traces == 0
    out = tick(asm, clock, 5.0)  # 31 s: the deadlines passed, the traces close
    assert out.traces == 2
    assert set(out.spans.column("trace_id").to_pylist()) == {never}
    assert [(d["trace_id"], len(d["span_ids"])) for d in out.signals] == [(windowed_never, 6)]
    assert [v.trace_id for v in rule.evaluate(out.spans)] == [never]  # the evaluate stage's verdict


STRUCTURAL_QUERIES = [
    '{ name = "a" } >> { name = "b" }',
    '{ name = "a" } > { name = "c" }',
    '{ name = "c" } < { name = "b" }',
    '{ name = "b" } ~ { name = "c" }',
    '{ name = "a" } && { name = "c" }',
    '{ name = "b" } << { name = "a" }',
    '{ name = "a" } !> { name = "c" }',
    '({ name = "a" } >> { name = "b" }) | count() > 2',
    '{ } > { name = "c" }',
    # Reading the trace or the span's children: whole-trace values, not the window's.
    "{ trace:duration > 150ns }",
    '{ trace:rootName = "noise" && name = "b" }',
    '{ trace:rootName = "noise" } | count() > 100',
    '{ trace:duration > 170ns || name = "c" }',
    '{ childCount > 6 && name = "a" }',
    '{ name = "b" } > { childCount = 0 && name = "c" }',
    # Aggregates of span values after structure.
    '{ name = "a" } >> { name = "b" } | avg(duration) > 1.5ns',
    '({ name = "a" } > { } ) | max(span.weight) > 8',
    '{ name = "c" } < { } | sum(span.weight) > 20',
    # Groups by a span value, across windows.
    "{ span.weight >= 0 } | by(span.weight) | count() > 8",
    '{ name = "b" } | by(span.weight) | avg(duration) > 2.5ns',
    '{ name = "a" } > { } | by(name) | count() > 3',
    "{ childCount > 2 } | count() > 9",
]


def tree_trace(trace: str, rng: random.Random) -> pa.Table:
    """A random span tree; the parent of span i is an earlier span, so roots are few."""
    n = rng.randint(60, 200)
    weights = [rng.choice([0, 1, 4]), rng.choice([0, 2, 6]), rng.choice([0, 1, 3]), 30]
    names = rng.choices(["a", "b", "c", "noise"], weights, k=n)
    table = spans(trace, names)
    ids = table.column("span_id").to_pylist()
    parents = [None] + [ids[rng.randrange(i)] for i in range(1, n)]
    table = with_column(table, "parent_span_id", pa.array(parents))
    ends = pa.array([i + rng.randint(1, 3) for i in range(n)], pa.int64())
    table = with_column(table, "end_ns", ends)
    weights_attr = ["{}" if rng.random() < 0.5 else f'{{"weight": {rng.randint(0, 9)}}}' for _ in range(n)]
    return with_column(table, "attributes", pa.array(weights_attr))


def test_structural_traceql_over_many_windows_matches_the_whole_trace() -> None:
    """Parents and children land in windows far apart, yet the verdict is the whole trace's."""
    rules = numbered_rules("tree", STRUCTURAL_QUERIES)
    rng = random.Random(7)
    traces = {f"{i:032x}": tree_trace(f"{i:032x}", rng) for i in range(1, 41)}
    expected = set(whole_violations(rules, traces))
    for c in rules:  # not vacuous: each query matches some traces and not others
        matched = {t for rule_id, t in expected if rule_id == c.rule.id}
        assert 0 < len(matched) < len(traces), c.rule.expression
    for window_spans in (10, 37):
        signals = feed_shuffled(rules, traces, window_spans, rng)
        assert {(d["rule_id"], d["trace_id"]) for d in signals} == expected, window_spans
        whole = whole_violations(rules, traces)
        for doc in signals:  # the evidence: spans of the whole trace's match
            assert doc["span_ids"]
            assert set(doc["span_ids"]) <= whole[(doc["rule_id"], doc["trace_id"])]
            assert "the whole trace" in doc["message"]


def test_a_late_parent_turns_a_structural_verdict_exactly_once() -> None:
    """The root arrives after its trace was judged: ``>>`` now matches, ``!>`` stops matching."""
    rules = [
        compile_rule(Rule(id="below", tenant="t", name="x", language="traceql", expression=q))
        for q in ['{ name = "root" } >> { name = "db" }']
    ] + [
        compile_rule(Rule(id="orphan", tenant="t", name="y", language="traceql", expression=q))
        for q in ['{ name = "root" } !> { name = "mid" }']
    ]
    clock, hooks = Clock(), InMemoryHooks()
    asm = make(clock, hooks, rules=rules)
    table = spans(T1, ["root", "mid", *(["noise"] * 30), "db"])
    ids = table.column("span_id").to_pylist()
    parents = [None, ids[0]] + [ids[1]] * (table.num_rows - 2)
    table = with_column(table, "parent_span_id", pa.array(parents))
    asm.add(table.slice(1), seq=0, offset=0)  # everything but the root
    out = tick(asm, clock, 10)
    # Forwarded whole to the evaluate stage, which finds "mid" without its root parent.
    assert out.spans.num_rows == table.num_rows - 1
    assert {(c.rule.id, v.trace_id) for c in rules for v in c.evaluate(out.spans)} == {("orphan", T1)}
    asm.add(table.slice(0, 1), seq=1, offset=1)
    late = tick(asm, clock, 0.1)
    assert rules_of(late) == {("below", T1)}  # a new violation; "orphan" is not repeated
    asm.add(table.slice(0, 1), seq=2, offset=2)
    assert rules_of(tick(asm, clock, 0.1)) == set()  # a replayed root changes nothing


def test_tree_state_survives_its_json_form_and_caps_what_it_keeps() -> None:
    import orjson

    from betrace.agents.assembly import tree as tr
    from betrace.agents.assembly.summary import RuleSummary, summaries_from_json, summaries_json

    state = tr.TreeState()
    n = tr.MAX_TREE_SPANS + 5
    state.extend(
        "0123456789abcdef" * n, "-" * 16 * n, bytes([1]) * n, [bytes(8 * n), bytes([1]) * n], [["x"] * n]
    )
    state.note_trace(5, 90, ("checkout", "web"))
    assert (state.spans, state.lost) == (tr.MAX_TREE_SPANS, 5)
    again = summaries_from_json(summaries_json({"k": RuleSummary(tree=state)}))["k"].tree
    assert again == state
    # Two rules that keep the same spans write them once.
    other = state.copy()
    other.bits = bytes(len(state.bits))
    doc = summaries_json({"k": RuleSummary(tree=state), "j": RuleSummary(tree=other)})
    assert doc["j"]["t"]["i"] == "=k" and "p" not in doc["j"]["t"]
    back = summaries_from_json(orjson.loads(orjson.dumps(doc)))
    assert (back["k"].tree, back["j"].tree) == (state, other)
    merged = again.copy()
    merged.merge(state)
    assert (merged.spans, merged.lost) == (tr.MAX_TREE_SPANS, 5 + n)
    assert again is not None and len(again.values[0]) == 8 * tr.MAX_TREE_SPANS
    later = tr.TreeState(start=1, end=50, root=("late-root", "svc"))
    merged.merge(later)  # the earliest start, the latest end, the first root to arrive
    assert (merged.start, merged.end, merged.root) == (1, 90, ("checkout", "web"))


def test_past_the_tree_cap_later_windows_are_judged_alone_and_the_signal_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from betrace.agents.assembly import tree as tr

    monkeypatch.setattr(tr, "MAX_TREE_SPANS", 20)
    rule = compile_rule(
        Rule(
            id="below",
            tenant="t",
            name="x",
            language="traceql",
            expression='{ name = "a" } >> { name = "b" }',
        )
    )
    clock, hooks = Clock(), InMemoryHooks()
    asm = make(clock, hooks, rules=[rule])
    table = spans(T1, [*(["noise"] * 30), "a", "b"])
    ids = table.column("span_id").to_pylist()
    parents = [None] * 31 + [ids[30]]
    table = with_column(table, "parent_span_id", pa.array(parents))
    for i in range(0, table.num_rows, 4):
        asm.add(table.slice(i, 4), seq=i, offset=i)
        tick(asm, clock, 0.01)
    out = tick(asm, clock, 10)
    assert out.spans.num_rows == 0
    (doc,) = out.signals
    assert "past the cap judged per window" in doc["message"]
