"""The stuck-partition watchdog's test: when a partition has records waiting and nothing under way.

The inputs are the faust consumer's own bookkeeping (read and committed offsets, acks
not yet committed, the fetch high-water mark); the integration and chaos suites run
the watchdog inside real workers.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from faust.types import TP

from betrace.streams.transport import waiting_offset

TOPIC = TP("demo.otlp_spans", 2)


@dataclass
class Bookkeeping:
    """The attributes of faust's Consumer that :func:`waiting_offset` reads."""

    highwaters: dict[TP, int | None] = field(default_factory=dict)
    _committed_offset: dict[TP, int | None] = field(default_factory=dict)
    _read_offset: dict[TP, int | None] = field(default_factory=dict)
    _acked: defaultdict[TP, list[int]] = field(default_factory=lambda: defaultdict(list))

    def highwater(self, tp: TP) -> int | None:
        return self.highwaters.get(tp)


def test_a_record_past_the_commit_that_was_never_read_is_waiting() -> None:
    # The CI's stall: one record at offset 5, committed 5, read offset reset to 5 by the seek.
    consumer = Bookkeeping({TOPIC: 6}, {TOPIC: 5}, {TOPIC: 5})
    assert waiting_offset(consumer, TOPIC, unacked=set()) == 5


def test_a_partition_never_committed_waits_at_its_start() -> None:
    assert waiting_offset(Bookkeeping({TOPIC: 3}, {}, {}), TOPIC, unacked=set()) == 0
    assert waiting_offset(Bookkeeping({TOPIC: 3}, {TOPIC: -1}, {TOPIC: None}), TOPIC, unacked=set()) == 0


def test_nothing_waits_at_the_end_or_before_the_first_fetch() -> None:
    assert waiting_offset(Bookkeeping({TOPIC: 5}, {TOPIC: 5}, {TOPIC: 5}), TOPIC, unacked=set()) is None
    assert waiting_offset(Bookkeeping({}, {TOPIC: 5}, {TOPIC: 5}), TOPIC, unacked=set()) is None


def test_records_read_past_the_commit_with_nothing_in_flight_are_waiting() -> None:
    # CI: committed 4, read 5, nothing unacknowledged nor acknowledged: faust dropped what it
    # delivered, or refused its acks as of an older generation. Nothing else re-reads it.
    read_on = Bookkeeping({TOPIC: 6}, {TOPIC: 4}, {TOPIC: 5})
    assert waiting_offset(read_on, TOPIC, unacked=set()) == 4


def test_work_under_way_is_never_stuck() -> None:
    # A message held unacknowledged (delivered and being processed, or held by the
    # assembler until its trace closes), acks waiting for the commit.
    held = Bookkeeping({TOPIC: 9}, {TOPIC: 5}, {TOPIC: 5})
    assert waiting_offset(held, TOPIC, unacked={TOPIC}) is None
    acked = Bookkeeping({TOPIC: 9}, {TOPIC: 5}, {TOPIC: 5})
    acked._acked[TOPIC].append(5)
    assert waiting_offset(acked, TOPIC, unacked=set()) is None


@dataclass
class _Watched(Bookkeeping):
    """What :meth:`SeekingConsumer.stuck_partitions` reads of the consumer besides."""

    flow_active: bool = True
    app: object = None
    _paused_partitions: set[TP] = field(default_factory=set)
    _unacked_messages: set[object] = field(default_factory=set)
    _waiting: dict[TP, tuple[int, float]] = field(default_factory=dict)
    _rewound: dict[TP, tuple[int, int]] = field(default_factory=dict)

    def assignment(self) -> set[TP]:
        return {TOPIC}


def test_the_watchdog_seeks_the_same_offset_again_after_a_doubled_wait() -> None:
    from betrace.streams.transport import STUCK_AFTER_S, SeekingConsumer

    consumer = _Watched({TOPIC: 6}, {TOPIC: 4}, {TOPIC: 5})

    def stuck(now: float) -> list[tuple[TP, int]]:
        return SeekingConsumer.stuck_partitions(consumer, now)  # type: ignore[arg-type]

    assert stuck(0.0) == []
    assert stuck(STUCK_AFTER_S) == [(TOPIC, 4)]
    assert stuck(STUCK_AFTER_S + 1) == []  # waiting again, at the same offset
    assert stuck(2 * STUCK_AFTER_S + 1) == []  # the second wait is twice as long
    assert stuck(3 * STUCK_AFTER_S + 1) == [(TOPIC, 4)]
    consumer._committed_offset[TOPIC] = 6  # it moved on: nothing waits
    assert stuck(10 * STUCK_AFTER_S) == []
