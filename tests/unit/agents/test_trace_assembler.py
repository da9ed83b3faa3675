"""TraceAssembler: closing traces on a fake clock and releasing message sequence numbers."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pytest

from betrace.agents.assemble import ClosedTraces, TraceAssembler
from betrace.metrics import InMemoryHooks
from betrace.streams.schemas import SPAN_SCHEMA

T1, T2, T3, T4 = ("1" * 32, "2" * 32, "3" * 32, "4" * 32)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def spans(*pairs: tuple[str, str], tenant: str = "t") -> pa.Table:
    """A SPAN_SCHEMA table with one row per ``(trace_id, span_name)``."""
    n = len(pairs)
    return pa.table(
        {
            "tenant": [tenant] * n,
            "trace_id": [t for t, _ in pairs],
            "span_id": [f"{i + 1:016x}" for i in range(n)],
            "parent_span_id": [None] * n,
            "name": [name for _, name in pairs],
            "service": ["svc"] * n,
            "kind": [1] * n,
            "status_code": [0] * n,
            "start_ns": list(range(n)),
            "end_ns": [i + 1 for i in range(n)],
            "attributes": ["{}"] * n,
            "resource_attributes": ["{}"] * n,
            "produced_ms": [0] * n,
        },
        schema=SPAN_SCHEMA,
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def hooks() -> InMemoryHooks:
    return InMemoryHooks()


def assembler(
    clock: FakeClock, hooks: InMemoryHooks, *, idle: float = 5.0, age: float = 60.0, live: int = 100
) -> TraceAssembler:
    return TraceAssembler(
        idle_timeout_s=idle, max_trace_age_s=age, max_live_traces=live, hooks=hooks, clock=clock
    )


def by_trace(closed: ClosedTraces) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for trace, name in zip(
        closed.spans.column("trace_id").to_pylist(), closed.spans.column("name").to_pylist(), strict=True
    ):
        out.setdefault(trace, []).append(name)
    return out


def test_trace_closes_after_idle_timeout(clock: FakeClock, hooks: InMemoryHooks) -> None:
    asm = assembler(clock, hooks)
    asm.add(spans((T1, "a"), (T1, "b")), seq=0)
    clock.advance(4.9)
    assert asm.close_due() is None
    assert asm.live_traces == 1
    clock.advance(0.1)
    closed = asm.close_due()
    assert closed is not None
    assert closed.spans.schema == SPAN_SCHEMA  # the internal sequence column is gone
    assert by_trace(closed) == {T1: ["a", "b"]}
    assert (closed.traces, closed.released) == (1, [0])
    assert asm.live_traces == 0
    assert hooks.total("betrace_traces_closed_total", cause="idle") == 1
    assert hooks.gauges[("betrace_live_traces", (("stage", "assemble"),))] == 0
    assert asm.close_due() is None


def test_new_spans_keep_a_trace_open(clock: FakeClock, hooks: InMemoryHooks) -> None:
    asm = assembler(clock, hooks)
    asm.add(spans((T1, "a")), seq=0)
    clock.advance(4)
    asm.add(spans((T1, "b")), seq=1)
    clock.advance(4)
    assert asm.close_due() is None
    clock.advance(1)
    closed = asm.close_due()
    assert closed is not None
    assert by_trace(closed) == {T1: ["a", "b"]}
    assert closed.released == [0, 1]


def test_trace_closes_at_max_age_even_when_busy(clock: FakeClock, hooks: InMemoryHooks) -> None:
    asm = assembler(clock, hooks, idle=5, age=10)
    for seq in range(4):
        asm.add(spans((T1, f"s{seq}")), seq=seq)
        if seq < 3:
            assert asm.close_due() is None
            clock.advance(3.5)
    # First seen at t=0, now t=10.5: too old although it was active 0 s ago.
    closed = asm.close_due()
    assert closed is not None
    assert by_trace(closed) == {T1: ["s0", "s1", "s2", "s3"]}
    assert hooks.total("betrace_traces_closed_total", cause="max_age") == 1
    assert hooks.total("betrace_traces_closed_total", cause="idle") == 0


def test_live_limit_closes_the_oldest_traces_first(clock: FakeClock, hooks: InMemoryHooks) -> None:
    asm = assembler(clock, hooks, live=2)
    for seq, trace in enumerate((T1, T2, T3, T4)):
        asm.add(spans((trace, "x")), seq=seq)
        clock.advance(1)
    asm.add(spans((T1, "late")), seq=9)  # recent activity does not make T1 younger
    closed = asm.close_due()
    assert closed is not None
    assert set(by_trace(closed)) == {T1, T2}
    assert by_trace(closed)[T1] == ["x", "late"]
    assert asm.live_traces == 2
    assert hooks.total("betrace_traces_closed_total", cause="live_limit") == 2
    assert closed.released == [0, 1, 9]


def test_live_limit_counts_traces_already_due(clock: FakeClock, hooks: InMemoryHooks) -> None:
    asm = assembler(clock, hooks, live=2)
    asm.add(spans((T1, "x")), seq=0)
    clock.advance(6)
    asm.add(spans((T2, "x"), (T3, "x")), seq=1)
    closed = asm.close_due()
    assert closed is not None
    assert set(by_trace(closed)) == {T1}  # idle; leaves exactly the limit open
    assert hooks.total("betrace_traces_closed_total", cause="live_limit") == 0


def test_spans_of_one_trace_from_many_messages_are_emitted_together(
    clock: FakeClock, hooks: InMemoryHooks
) -> None:
    asm = assembler(clock, hooks)
    asm.add(spans((T1, "root"), (T2, "other")), seq=10)
    clock.advance(1)
    asm.add(spans((T1, "child-1")), seq=11)
    clock.advance(1)
    asm.add(spans((T2, "more"), (T1, "child-2")), seq=12)
    clock.advance(5)
    closed = asm.close_due()
    assert closed is not None
    assert Counter(by_trace(closed)[T1]) == Counter(["root", "child-1", "child-2"])
    assert Counter(by_trace(closed)[T2]) == Counter(["other", "more"])
    assert closed.traces == 2
    assert closed.released == [10, 11, 12]


def test_seq_is_released_only_when_none_of_its_spans_is_pending(
    clock: FakeClock, hooks: InMemoryHooks
) -> None:
    asm = assembler(clock, hooks)
    asm.add(spans((T1, "a"), (T2, "a")), seq=1)  # message 1 holds spans of two traces
    asm.add(spans((T1, "b")), seq=2)
    clock.advance(3)
    asm.add(spans((T2, "b")), seq=3)  # keeps T2 open
    clock.advance(2)

    first = asm.close_due()
    assert first is not None
    assert set(by_trace(first)) == {T1}
    # Message 2 is done; message 1 still has a pending span of T2; 3 is pending.
    assert first.released == [2]

    clock.advance(3)
    second = asm.close_due()
    assert second is not None
    assert by_trace(second) == {T2: ["a", "b"]}
    assert second.released == [1, 3]


def test_empty_message_is_released_at_next_check(clock: FakeClock, hooks: InMemoryHooks) -> None:
    asm = assembler(clock, hooks)
    asm.add(spans((T1, "a")), seq=1)
    asm.add(SPAN_SCHEMA.empty_table(), seq=2)
    closed = asm.close_due()
    assert closed is not None
    assert closed.spans.num_rows == closed.traces == 0
    assert closed.released == [2]
    assert asm.close_due() is None  # released once only


def test_flush_all_closes_everything(clock: FakeClock, hooks: InMemoryHooks) -> None:
    asm = assembler(clock, hooks)
    asm.add(spans((T1, "a"), (T2, "a")), seq=5)
    asm.add(spans((T3, "a")), seq=6)
    closed = asm.close_due(flush_all=True)
    assert closed is not None
    assert set(by_trace(closed)) == {T1, T2, T3}
    assert closed.traces == 3
    assert closed.released == [5, 6]
    assert asm.live_traces == 0
    assert asm.close_due(flush_all=True) is None


def test_closed_trace_with_late_spans_starts_again(clock: FakeClock, hooks: InMemoryHooks) -> None:
    asm = assembler(clock, hooks)
    asm.add(spans((T1, "a")), seq=1)
    clock.advance(5)
    assert asm.close_due() is not None
    asm.add(spans((T1, "late")), seq=2)
    clock.advance(5)
    closed = asm.close_due()
    assert closed is not None
    assert by_trace(closed) == {T1: ["late"]}
    assert closed.released == [2]
    assert hooks.total("betrace_traces_closed_total") == 2
