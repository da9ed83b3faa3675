"""Late spans across workers: a decision written through to Redis is found by another assembler."""

from __future__ import annotations

import pytest
from tests.unit.agents.test_assembly_windows import COMPILED, T1, T2, Clock, make, rules_of, spans, tick

from betrace.agents.assembly.assembler import DECISIONS_TABLE, TraceAssembler
from betrace.cache import CacheTier
from betrace.cache.traces import TraceMetaCache
from betrace.metrics import InMemoryHooks


def _meta(tier: CacheTier, clock: Clock) -> TraceMetaCache:
    return TraceMetaCache(
        tier,
        ttl_s=600.0,
        rules_for=lambda t: COMPILED if t == "t" else [],
        decision_window_s=lambda _t: 60.0,
        clock=clock,
    )


async def _feed(asm: TraceAssembler, meta: TraceMetaCache, table: object, seq: int, offset: int) -> None:
    """What the assemble agent does per batch: look up unknown traces, restore, then add."""
    unknown = asm.unknown_traces([table])  # type: ignore[list-item]
    for trace_id, decision in (await meta.lookup(unknown)).items():
        asm.restore(DECISIONS_TABLE, trace_id, decision)
    asm.add(table, seq, offset=offset)  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_a_late_span_on_another_worker_is_judged_against_the_shared_decision(tier: CacheTier) -> None:
    clock = Clock()
    first_hooks, second_hooks = InMemoryHooks(), InMemoryHooks()
    first, second = make(clock, first_hooks), make(clock, second_hooks)
    meta_first = _meta(tier, clock)
    meta_second = _meta(CacheTier(tier.settings, namespace=tier.namespace, hooks=InMemoryHooks()), clock)

    # Worker 1 decides T1 (windowed, passes) and writes its decision through.
    await _feed(first, meta_first, spans(T1, ["http.request", *(["noise"] * 12)]), 1, 1)
    tick(first, clock, 0.1)
    out = tick(first, clock, 6)
    assert out.traces == 1 and not out.signals
    await meta_first.write_through(
        {w.key: w.value for w in out.writes if w.table == DECISIONS_TABLE and w.value}
    )

    # Worker 2 never saw T1 (its changelog entry was lost to the cap, say); a late span arrives.
    await _feed(second, meta_second, spans(T1, ["pii.access"], start=50), 2, 20)
    await _feed(second, meta_second, spans(T2, ["http.request"]), 3, 21)  # a new trace: a miss
    out = tick(second, clock, 2)
    assert rules_of(out) == {("pii", T1)}  # pass turned violation: one late signal
    assert second_hooks.total("betrace_late_spans_total") == 1
    assert out.spans.num_rows == 0  # T1 was not re-opened and forwarded as a new trace
    out = tick(second, clock, 6)
    assert out.traces == 1  # T2 closes normally
    await meta_second.cache.tier.aclose()
    await tier.aclose()


@pytest.mark.asyncio
async def test_without_the_shared_decision_the_late_span_opens_a_new_trace(tier: CacheTier) -> None:
    clock = Clock()
    hooks = InMemoryHooks()
    second = make(clock, hooks)
    meta = _meta(tier, clock)
    await _feed(second, meta, spans(T1, ["pii.access"], start=50), 2, 20)
    out = tick(second, clock, 6)
    assert hooks.total("betrace_late_spans_total") == 0
    assert out.spans.num_rows == 1  # judged as a fresh trace by the evaluate stage
    await tier.aclose()
