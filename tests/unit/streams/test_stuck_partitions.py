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


def test_work_under_way_is_never_stuck() -> None:
    # Read past the commit (delivered, being processed), a message held unacknowledged
    # (the assembler holds messages until their traces close), acks waiting for the commit.
    read_on = Bookkeeping({TOPIC: 9}, {TOPIC: 5}, {TOPIC: 7})
    assert waiting_offset(read_on, TOPIC, unacked=set()) is None
    held = Bookkeeping({TOPIC: 9}, {TOPIC: 5}, {TOPIC: 5})
    assert waiting_offset(held, TOPIC, unacked={TOPIC}) is None
    acked = Bookkeeping({TOPIC: 9}, {TOPIC: 5}, {TOPIC: 5})
    acked._acked[TOPIC].append(5)
    assert waiting_offset(acked, TOPIC, unacked=set()) is None
