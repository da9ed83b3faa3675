"""Closing a trace soon after its root span arrived (``root_close_delay_s``)."""

from __future__ import annotations

import pyarrow as pa
from tests.unit.agents.test_assembly_windows import (
    COMPILED,
    T1,
    T2,
    T3,
    Clock,
    _at,
    audit_sequence_rule,
    make,
    rules_of,
    spans,
    tick,
    with_column,
)

from betrace.agents.app import close_tick_s
from betrace.agents.assembly.assembler import TraceAssembler
from betrace.config import Settings
from betrace.metrics import InMemoryHooks
from betrace.rules.model import CompiledRule

ROOT_DELAY = 0.2


def tree(trace: str, names: list[str], *, start: int = 0, root: bool = True) -> pa.Table:
    """Spans of ``trace``: the first is the root (when ``root``), the others its children."""
    table = spans(trace, names, start=start)
    first = table.column("span_id")[0].as_py()
    parents = [None if root else "f" * 16, *([first] * (len(names) - 1))]
    return with_column(table, "parent_span_id", pa.array(parents, pa.string()))


def children(trace: str, names: list[str], *, start: int) -> pa.Table:
    table = spans(trace, names, start=start)
    return with_column(table, "parent_span_id", pa.array(["0" * 15 + "1"] * len(names), pa.string()))


def closed_by(hooks: InMemoryHooks, cause: str) -> float:
    return hooks.total("betrace_traces_closed_total", cause=cause)


def rooted_assembler(
    clock: Clock, hooks: InMemoryHooks, *, rules: list[CompiledRule] = COMPILED
) -> TraceAssembler:
    return make(clock, hooks, rules=rules, root_close_delay_s=ROOT_DELAY)


def test_a_trace_with_its_root_closes_after_the_root_delay_and_others_wait() -> None:
    clock, hooks = Clock(), InMemoryHooks()
    asm = rooted_assembler(clock, hooks)
    asm.add(tree(T1, ["GET /", "db.query"]), seq=1, offset=1)
    asm.add(tree(T2, ["db.query", "db.query"], root=False), seq=2, offset=2)
    assert tick(asm, clock, 0.1).traces == 0
    out = tick(asm, clock, 0.15)
    assert out.traces == 1 and set(out.spans.column("trace_id").to_pylist()) == {T1}
    assert out.released == [1]
    assert closed_by(hooks, "root") == 1
    assert hooks.total("betrace_assembly_limit_total") == 0  # an ordinary close, not an anomaly
    out = tick(asm, clock, 5.0)  # no root: the idle timeout closes it
    assert out.traces == 1 and set(out.spans.column("trace_id").to_pylist()) == {T2}
    assert closed_by(hooks, "idle") == 1


def test_spans_still_arriving_keep_a_rooted_trace_open() -> None:
    clock, hooks = Clock(), InMemoryHooks()
    asm = rooted_assembler(clock, hooks)
    asm.add(tree(T1, ["GET /"]), seq=1, offset=1)
    for i in range(5):  # children every 0.15 s: never idle for the root delay
        assert tick(asm, clock, 0.15).traces == 0
        asm.add(children(T1, ["db.query"], start=10 + i), seq=2 + i, offset=2 + i)
    out = tick(asm, clock, 0.25)
    assert out.traces == 1 and out.spans.num_rows == 6
    assert out.released == [1, 2, 3, 4, 5, 6]


def test_the_root_may_come_last() -> None:
    clock, hooks = Clock(), InMemoryHooks()
    asm = rooted_assembler(clock, hooks)
    asm.add(children(T1, ["db.query", "db.query"], start=10), seq=1, offset=1)
    assert tick(asm, clock, 1.0).traces == 0  # no root yet: the idle timeout applies
    asm.add(tree(T1, ["GET /"]), seq=2, offset=2)
    out = tick(asm, clock, 0.25)
    assert out.traces == 1 and out.spans.num_rows == 3


def test_a_span_after_the_root_close_is_judged_with_the_trace() -> None:
    """Closing early loses nothing: a later child meets the remembered verdict."""
    clock, hooks = Clock(), InMemoryHooks()
    asm = rooted_assembler(clock, hooks)
    asm.add(tree(T1, ["GET /", "pii.access", "audit.log"]), seq=1, offset=1)
    asm.add(tree(T3, ["GET /", "db.query"]), seq=2, offset=2)
    out = tick(asm, clock, 0.25)
    assert out.traces == 2 and not out.signals  # both pass; the evaluate stage sees them whole
    asm.add(children(T1, ["boom"], start=10), seq=3, offset=3)  # the `tq` rule's span, late
    out = tick(asm, clock, 1.0)
    assert rules_of(out) == {("tq", T1)}
    assert out.released == [3]
    assert hooks.total("betrace_late_spans_total") == 1
    assert asm.live_traces == 0


def test_off_by_default_even_when_every_span_is_a_root() -> None:
    clock, hooks = Clock(), InMemoryHooks()
    asm = make(clock, hooks)
    asm.add(spans(T1, ["GET /", "x"]), seq=1, offset=1)  # parent ids all null: roots
    assert tick(asm, clock, 4.0).traces == 0
    assert tick(asm, clock, 1.5).traces == 1
    assert closed_by(hooks, "idle") == 1 and closed_by(hooks, "root") == 0


def test_a_rooted_trace_still_waits_for_its_followed_by_deadline() -> None:
    rule = audit_sequence_rule()
    clock, hooks = Clock(), InMemoryHooks()
    asm = rooted_assembler(clock, hooks, rules=[rule])
    now_ns = int(clock.now * 1e9)
    asm.add(_at(tree(T1, ["GET /", "pii.access"]), now_ns), seq=1, offset=1)
    assert tick(asm, clock, 1.0).traces == 0
    assert hooks.total("betrace_traces_held_total") == 1
    asm.add(_at(children(T1, ["audit.log"], start=10), now_ns + 2 * 10**9), seq=2, offset=2)
    out = tick(asm, clock, 0.25)
    assert out.traces == 1 and not out.signals
    assert [v.trace_id for v in rule.evaluate(out.spans)] == []


def test_revoked_and_closed_traces_leave_the_root_index() -> None:
    clock, hooks = Clock(), InMemoryHooks()
    asm = rooted_assembler(clock, hooks)
    asm.add(tree(T1, ["GET /"]), seq=1, offset=1)
    asm.add(tree(T2, ["GET /"]), seq=2, offset=2)
    revoked = {p for p in range(4) if asm.drop_partitions({p})}
    assert revoked and asm.live_traces == 0
    assert all(not traces for traces in asm._rooted.values())


def test_the_delay_is_a_setting_with_per_tenant_overrides() -> None:
    settings = Settings(
        root_close_delay_s=0.3,
        assembly_tenants={"slow": {"root_close_delay_s": 0}},
    )
    assert settings.assembly_policy("acme").root_close_delay_s == 0.3
    assert settings.assembly_policy("slow").root_close_delay_s == 0.0
    assert Settings().assembly_policy("acme").root_close_delay_s == 0.0


def test_the_close_tick_follows_the_shortest_idle_time() -> None:
    assert close_tick_s(Settings()) == 0.25
    assert close_tick_s(Settings(idle_timeout_s=0.5)) == 0.125
    assert close_tick_s(Settings(root_close_delay_s=0.1)) == 0.025
    tenant = Settings(assembly_tenants={"fast": {"root_close_delay_s": 0.2}})
    assert close_tick_s(tenant) == 0.05
    assert close_tick_s(Settings(root_close_delay_s=0.001)) == 0.01  # a floor: the tick has a cost


def test_a_late_tick_still_names_the_root_as_the_cause() -> None:
    clock, hooks = Clock(), InMemoryHooks()
    asm = rooted_assembler(clock, hooks)
    asm.add(tree(T1, ["GET /", "db.query"]), seq=1, offset=1)
    assert tick(asm, clock, 6.0).traces == 1  # past the idle timeout too: a tick that ran late
    assert closed_by(hooks, "root") == 1 and closed_by(hooks, "idle") == 0
