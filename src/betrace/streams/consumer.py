"""faust's Kafka consumer, with a seek that does not skip partitions never committed.

After a rebalance faust seeks every assigned partition to its committed offset
(``perform_seek`` → aiokafka's ``seek_to_committed``), but aiokafka seeks only
when the committed offset is above 0. A partition the group never committed
(its first records, when the worker that read them died before the commit)
keeps the fetch position it had, and records prefetched while faust held the
partition paused for table recovery are discarded: they are never delivered
(faust-streaming issues #216 and #221). The kill -9 chaos scenario lost the first
candidate signals of a partition this way. Here such partitions are sought to
their beginning, as ``auto_offset_reset="earliest"`` promises.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.transport.drivers.aiokafka import Consumer as FaustAIOKafkaConsumer
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


def install(app: Any) -> None:
    """Make ``app`` create :class:`SeekingConsumer` (before its consumer exists)."""
    app.transport.Consumer = SeekingConsumer
