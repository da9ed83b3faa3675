"""faust's Kafka consumer and producer, with two fixes for at-least-once without loss or duplicates.

**The seek.** After a rebalance faust seeks every assigned partition to its committed offset
(``perform_seek`` → aiokafka's ``seek_to_committed``), but aiokafka seeks only
when the committed offset is above 0. A partition the group never committed
(its first records, when the worker that read them died before the commit)
keeps the fetch position it had, and records prefetched while faust held the
partition paused for table recovery are discarded: they are never delivered
(faust-streaming issues #216 and #221). The kill -9 chaos scenario lost the first
candidate signals of a partition this way. Here such partitions are sought to
their beginning, as ``auto_offset_reset="earliest"`` promises. For a partition
this worker keeps across a rebalance that is what faust's seek does for committed
ones: it re-delivers what was read since the last commit, which every sink dedupes.

**The watchdog.** faust can still drop a fetched batch without delivering it (a
batch cut short by a rebalance, a record fetched while it brought a partition back
after table recovery): aiokafka's position has moved on, nothing is in flight, and
the partition's committed offset stays below its end forever, with no error. The
CI saw this as a pipeline that never drained (one record, ``committed 5 end 6``,
after a worker restart with state to recover). :class:`SeekingConsumer` checks every
few seconds for an assigned, unpaused partition that has records past its committed
offset, nothing read past it, nothing unacknowledged and nothing acknowledged but
uncommitted, for :data:`STUCK_AFTER_S`; it seeks it back to the committed offset
(the start, if never committed). Re-delivery is always safe here: every stage dedupes.

**The commit.** faust commits over a hole at the head of a partition's acknowledged
offsets, and acknowledges messages its streams skip for an older consumer
generation without processing them (the seek after a rebalance re-delivers them, but
their offsets already count as done). :class:`SeekingConsumer` commits only past
processed records (:mod:`betrace.streams.offsets`): it refuses acknowledgements
from an older generation or during a rebalance, and a hole at the head waits for its
in-flight messages, or is re-read from the broker.

**The producer.** faust makes its producer idempotent only under
``processing_guarantee="exactly_once"``. Otherwise aiokafka retries a produce
request whose acknowledgement was lost (a leader change, a broker restart) and
the broker appends the batch twice (the likely source of the signals the
broker-restart chaos scenario saw published twice). An idempotent producer lets the broker drop the retry.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.transport.drivers.aiokafka import Consumer as FaustAIOKafkaConsumer
from faust.transport.drivers.aiokafka import Producer as FaustAIOKafkaProducer
from faust.types import TP, Message
from mode import Service

from betrace.streams.offsets import HeadHole, HoleJudge, take_run

logger = logging.getLogger(__name__)

#: faust names the changelog topics of its tables ``<app id>-<table>-changelog``; their
#: offsets are never committed, and faust's recovery seeks them itself.
CHANGELOG_SUFFIX = "-changelog"
#: How long a partition may have records waiting with none delivered before it is re-sought.
STUCK_AFTER_S = 10.0
#: The longest wait before the same offset is sought again (the wait doubles each time).
MAX_STUCK_BACKOFF_S = 300.0
#: How often the watchdog looks.
WATCHDOG_INTERVAL_S = 2.0


async def seek_to_committed_or_beginning(consumer: Any) -> dict[Any, Any]:
    """Seek an aiokafka consumer's assigned partitions to their committed offsets, and the
    ones never committed (changelogs aside) to their beginning; the committed offsets."""
    committed: dict[Any, Any] = await consumer.seek_to_committed()
    never = [
        tp
        for tp, offset in committed.items()
        if (offset is None or offset <= 0) and not tp.topic.endswith(CHANGELOG_SUFFIX)
    ]
    if never:
        await consumer.seek_to_beginning(*never)
        # The first offset a commit must cover: not 0 once retention deleted the log's start.
        starts = await consumer.beginning_offsets(never)
        committed.update({tp: starts[tp] for tp in never if starts.get(tp)})
    return committed


class _SeekingThread(AIOKafkaConsumerThread):
    async def seek_to_committed(self) -> Mapping[TP, int]:
        consumer = self._ensure_consumer()
        result: Mapping[TP, int] = await self.call_thread(seek_to_committed_or_beginning, consumer)
        return result


def waiting_offset(consumer: Any, tp: TP, unacked: set[TP]) -> int | None:
    """Where ``tp`` should be read from if it has records waiting and nothing under way.

    ``None`` unless records past the committed offset exist (the fetch high-water mark)
    and no message of ``tp`` is unacknowledged or acknowledged but not yet committed:
    then a delivery is due and nothing explains its absence. That holds even when faust
    read past the committed offset: the records it delivered there were dropped, or their
    acknowledgements refused as of an older generation (seen on CI: committed 4, read 5,
    nothing in flight, for two minutes).
    """
    if tp in unacked or consumer._acked.get(tp):
        return None
    committed = consumer._committed_offset.get(tp)
    start = committed if committed is not None and committed > 0 else 0
    highwater = consumer.highwater(tp)
    if highwater is None or highwater <= start:
        return None
    return start


class SeekingConsumer(FaustAIOKafkaConsumer):
    """The aiokafka consumer faust uses, with :class:`_SeekingThread`, the stuck-partition
    watchdog and the strict commit rule."""

    #: Partition -> (offset it waits at, since when), for the watchdog.
    _waiting: dict[TP, tuple[int, float]]
    #: Partition -> (offset the watchdog last sought it back to, how often). Again at the same
    #: offset only after twice the wait: a topic whose last offset holds no record (a
    #: transaction marker) looks stuck for ever, and a re-read of nothing is all it costs.
    _rewound: dict[TP, tuple[int, int]]
    #: Partitions the watchdog sought back, since start.
    rewinds: int = 0
    #: Partition -> committed offset to seek it back to: a hole at its head nothing explains.
    _holes_due: dict[TP, int]
    #: Acknowledgements refused: of messages from before the last rebalance.
    stale_acks: int = 0
    #: Holes committed over after a re-read found them empty.
    holes_skipped: int = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._waiting = {}
        self._rewound = {}
        self._holes = HoleJudge()
        self._holes_due = {}

    def ack(self, message: Message) -> bool:
        """faust's ack, refused for a message of an older generation (or mid-rebalance).

        faust's streams acknowledge the messages they skip for being of an older
        generation, unprocessed; a handler that finishes after a revocation
        acknowledges work whose partition state was dropped. The seek after the
        rebalance re-delivers both from the committed offset, and those copies count.
        """
        app = self.app
        if message.generation_id != app.consumer_generation_id or app.rebalancing:
            if not message.acked:
                message.acked = True
                self._unacked_messages.discard(message)
                self.stale_acks += 1
            return False
        acked: bool = super().ack(message)
        return acked

    def _new_offset(self, tp: TP) -> int | None:
        """The offset to commit for ``tp``: past the acknowledged run starting at the committed
        offset, never over a hole (see :mod:`betrace.streams.offsets`)."""
        if tp.topic.endswith(CHANGELOG_SUFFIX):
            offset: int | None = super()._new_offset(tp)
            return offset
        acked, index = self._acked[tp], self._acked_index[tp]
        head = self._committed_offset.get(tp) or 0
        offset = take_run(acked, index, head)
        if offset is not None or not acked:
            return offset
        first = acked[0]
        in_flight = [m.offset for m in list(self._unacked_messages) if m.tp == tp]
        decision = self._holes.decide(tp, head, first, in_flight, time.monotonic())
        if decision is HeadHole.REWIND:
            self._holes_due[tp] = head
            return None
        if decision is HeadHole.WAIT:
            return None
        logger.warning(
            "%s[%d]: offsets %d-%d were re-read from the broker and are still missing; committing over them",
            tp.topic,
            tp.partition,
            head,
            first - 1,
        )
        self.holes_skipped += 1
        return take_run(acked, index, first)

    async def _add_gap(self, tp: TP, offset_from: int, offset_to: int) -> None:
        """faust notes offsets skipped between two fetched records as committable; here they
        are a hole that :meth:`_new_offset` re-reads (our topics have no such offsets)."""
        del tp, offset_from, offset_to

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        for tp in revoked:
            self._holes.forget(tp)
            self._holes_due.pop(tp, None)
        await super().on_partitions_revoked(revoked)

    def _new_consumer_thread(self) -> AIOKafkaConsumerThread:
        return _SeekingThread(self, loop=self.loop, beacon=self.beacon)

    @Service.timer(WATCHDOG_INTERVAL_S)
    async def _stuck_partition_watchdog(self) -> None:
        holes, self._holes_due = self._holes_due, {}
        assigned = self.assignment() if holes else set()
        for tp, offset in holes.items():
            if tp in assigned:
                logger.warning(
                    "%s[%d]: records from offset %d were never acknowledged nor are in flight, "
                    "later ones were; seeking back to %d",
                    tp.topic,
                    tp.partition,
                    offset,
                    offset,
                )
                self.rewinds += 1
                await self.seek(tp, offset)
        for tp, offset in self.stuck_partitions(time.monotonic()):
            logger.warning(
                "%s[%d]: records past offset %d wait, none was delivered for %.0f s and none is "
                "in flight (faust dropped a fetched batch); seeking back to %d",
                tp.topic,
                tp.partition,
                offset,
                STUCK_AFTER_S,
                offset,
            )
            self.rewinds += 1
            await self.seek(tp, offset)

    def stuck_partitions(self, now: float) -> list[tuple[TP, int]]:
        """Partitions that have waited :data:`STUCK_AFTER_S` at one offset (see the module doc)."""
        waiting, rewound = self._waiting, self._rewound
        app = self.app
        if not self.flow_active or getattr(app, "rebalancing", False) or getattr(app, "in_recovery", False):
            waiting.clear()
            return []
        try:
            assigned = self.assignment()
        except Exception:  # noqa: BLE001 - not started, or stopping: nothing to watch
            waiting.clear()
            return []
        paused = set(self._paused_partitions)
        unacked = {message.tp for message in list(self._unacked_messages)}
        stuck: list[tuple[TP, int]] = []
        for tp in assigned:
            offset = None
            if tp not in paused and not tp.topic.endswith(CHANGELOG_SUFFIX):
                offset = waiting_offset(self, tp, unacked)
            if offset is None:
                waiting.pop(tp, None)
                continue
            before = rewound.get(tp)
            times = before[1] if before is not None and before[0] == offset else 0
            seen = waiting.get(tp)
            if seen is None or seen[0] != offset:
                waiting[tp] = (offset, now)
            elif now - seen[1] >= min(STUCK_AFTER_S * 2**times, MAX_STUCK_BACKOFF_S):
                del waiting[tp]
                rewound[tp] = (offset, times + 1)
                stuck.append((tp, offset))
        for tp in set(waiting) - set(assigned):
            del waiting[tp]
        return stuck


class IdempotentProducer(FaustAIOKafkaProducer):
    """faust's aiokafka producer with ``enable_idempotence`` (and so ``acks=all``) always on."""

    def _settings_extra(self) -> Mapping[str, Any]:
        return {**super()._settings_extra(), "acks": "all", "enable_idempotence": True}


def install(app: Any) -> None:
    """Make ``app`` create these (before its consumer and producer exist)."""
    app.transport.Consumer = SeekingConsumer
    app.transport.Producer = IdempotentProducer
