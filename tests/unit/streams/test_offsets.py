"""The commit rule: a partition's committed offset never passes a record not processed.

The rule is exercised on faust's own bookkeeping (acknowledged offsets, their index,
committed offsets, unacknowledged messages) through :meth:`SeekingConsumer._new_offset`;
the integration and chaos suites run it inside real workers against the broker.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from faust.types import TP
from hypothesis import given
from hypothesis import strategies as st

from betrace.streams.offsets import HOLE_CONFIRM_S, HeadHole, HoleJudge, take_run
from betrace.streams.transport import SeekingConsumer

TOPIC = TP("demo.spans", 1)


def test_the_run_from_the_committed_offset_is_taken() -> None:
    acked, index = [7, 5, 6, 9], {5, 6, 7, 9}
    assert take_run(acked, index, 5) == 8
    assert acked == [9]
    assert index == {9}


def test_a_hole_at_the_head_commits_nothing() -> None:
    # faust's own rule commits 7 here: it tolerates one missing offset at the head.
    acked = [6]
    assert take_run(acked, {6}, 5) is None
    assert acked == [6]


def test_offsets_below_the_head_are_dropped() -> None:
    acked, index = [3, 4, 5], {3, 4, 5}
    assert take_run(acked, index, 5) == 6
    assert acked == []
    assert index == set()


def test_a_hole_with_its_message_in_flight_waits() -> None:
    judge = HoleJudge()
    assert judge.decide(TOPIC, 5, 7, in_flight=[5, 9], now=0.0) is HeadHole.WAIT
    # Waiting on a message is no re-read: once it is gone the hole is re-read first.
    assert judge.decide(TOPIC, 5, 7, in_flight=[9], now=100.0) is HeadHole.REWIND


def test_an_unexplained_hole_is_re_read_then_skipped_only_after_the_confirm_time() -> None:
    judge = HoleJudge()
    assert judge.decide(TOPIC, 5, 7, in_flight=[], now=0.0) is HeadHole.REWIND
    assert judge.decide(TOPIC, 5, 7, in_flight=[], now=HOLE_CONFIRM_S / 2) is HeadHole.WAIT
    assert judge.decide(TOPIC, 5, 7, in_flight=[], now=HOLE_CONFIRM_S) is HeadHole.SKIP


def test_a_new_head_or_a_revocation_starts_over() -> None:
    judge = HoleJudge()
    judge.decide(TOPIC, 5, 7, in_flight=[], now=0.0)
    assert judge.decide(TOPIC, 8, 10, in_flight=[], now=HOLE_CONFIRM_S) is HeadHole.REWIND
    judge.forget(TOPIC)
    assert judge.decide(TOPIC, 8, 10, in_flight=[], now=2 * HOLE_CONFIRM_S) is HeadHole.REWIND


@dataclass(frozen=True)
class _Message:
    tp: TP
    offset: int


@dataclass
class Bookkeeping:
    """The attributes of faust's Consumer that :meth:`SeekingConsumer._new_offset` reads."""

    _committed_offset: dict[TP, int | None] = field(default_factory=dict)
    _acked: defaultdict[TP, list[int]] = field(default_factory=lambda: defaultdict(list))
    _acked_index: defaultdict[TP, set[int]] = field(default_factory=lambda: defaultdict(set))
    _unacked_messages: set[Any] = field(default_factory=set)
    _holes: HoleJudge = field(default_factory=HoleJudge)
    _holes_due: dict[TP, int] = field(default_factory=dict)
    holes_skipped: int = 0

    def ack(self, offset: int) -> None:
        self._acked[TOPIC].append(offset)
        self._acked_index[TOPIC].add(offset)

    def commit(self) -> int | None:
        offset: int | None = SeekingConsumer._new_offset(self, TOPIC)  # type: ignore[arg-type]
        if offset is not None:
            self._committed_offset[TOPIC] = offset
        return offset


def test_a_partition_never_committed_commits_from_its_first_offset() -> None:
    # faust skips its head check when nothing was committed (``if committed_offset:``).
    consumer = Bookkeeping()
    consumer._unacked_messages.add(_Message(TOPIC, 0))  # still being processed
    consumer.ack(1)
    consumer.ack(2)
    assert consumer.commit() is None
    consumer._unacked_messages.clear()
    consumer.ack(0)
    assert consumer.commit() == 3


def test_an_unexplained_hole_is_sought_back_to_not_committed_over() -> None:
    consumer = Bookkeeping({TOPIC: 5})
    consumer.ack(6)
    assert consumer.commit() is None
    assert consumer._holes_due == {TOPIC: 5}
    consumer.ack(5)  # the re-read delivered it
    assert consumer.commit() == 7


@given(
    st.integers(min_value=1, max_value=40).flatmap(
        lambda n: st.tuples(st.just(n), st.permutations(range(n)), st.integers(min_value=0, max_value=n))
    )
)
def test_commits_never_pass_a_message_in_flight(case: tuple[int, list[int], int]) -> None:
    """Messages 0..n-1 are delivered, acknowledged in any order (the first ``done`` of the
    order), and a commit is tried after each acknowledgement."""
    n, order, done = case
    consumer = Bookkeeping()
    consumer._unacked_messages = {_Message(TOPIC, offset) for offset in range(n)}
    committed = 0
    for offset in order[:done]:
        consumer._unacked_messages = {m for m in consumer._unacked_messages if m.offset != offset}
        consumer.ack(offset)
        committed = consumer.commit() or committed
        in_flight = [m.offset for m in consumer._unacked_messages]
        assert committed <= min(in_flight, default=n)
    assert consumer._holes_due == {}
    processed = set(order[:done])
    expected = next((o for o in range(n) if o not in processed), n)
    assert committed == expected
