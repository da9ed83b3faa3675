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

**The producer.** faust makes its producer idempotent only under
``processing_guarantee="exactly_once"``. Otherwise aiokafka retries a produce
request whose acknowledgement was lost (a leader change, a broker restart) and
the broker appends the batch twice (the likely source of the signals the
broker-restart chaos scenario saw published twice). An idempotent producer lets the broker drop the retry.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.transport.drivers.aiokafka import Consumer as FaustAIOKafkaConsumer
from faust.transport.drivers.aiokafka import Producer as FaustAIOKafkaProducer
from faust.types import TP

#: faust names the changelog topics of its tables ``<app id>-<table>-changelog``; their
#: offsets are never committed, and faust's recovery seeks them itself.
CHANGELOG_SUFFIX = "-changelog"


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
    return committed


class _SeekingThread(AIOKafkaConsumerThread):
    async def seek_to_committed(self) -> Mapping[TP, int]:
        consumer = self._ensure_consumer()
        result: Mapping[TP, int] = await self.call_thread(seek_to_committed_or_beginning, consumer)
        return result


class SeekingConsumer(FaustAIOKafkaConsumer):
    """The aiokafka consumer faust uses, with :class:`_SeekingThread`."""

    def _new_consumer_thread(self) -> AIOKafkaConsumerThread:
        return _SeekingThread(self, loop=self.loop, beacon=self.beacon)


class IdempotentProducer(FaustAIOKafkaProducer):
    """faust's aiokafka producer with ``enable_idempotence`` (and so ``acks=all``) always on."""

    def _settings_extra(self) -> Mapping[str, Any]:
        return {**super()._settings_extra(), "acks": "all", "enable_idempotence": True}


def install(app: Any) -> None:
    """Make ``app`` create these (before its consumer and producer exist)."""
    app.transport.Consumer = SeekingConsumer
    app.transport.Producer = IdempotentProducer
