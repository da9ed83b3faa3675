"""Which of some keys a topic already holds: the fence against re-publishing a signal.

The signal sink publishes a signal and then marks it emitted in the tenant's
store. A worker killed between the broker's acknowledgement and the mark
leaves a signal that is published but looks unpublished; the next attempt
would publish it a second time. Such "earlier, unmarked" signals are rare
(only after a crash or a failed batch), so before re-publishing them the sink
reads the signals topic from just before the signal was first recorded and
skips every id it finds. Fresh signals never pay for this.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from betrace.errors import BrokerError
from betrace.streams.admin import topic_partitions

logger = logging.getLogger(__name__)

#: Read this much before the first record time: producer clocks and ours may differ.
CLOCK_MARGIN_MS = 60_000


async def published_keys(
    brokers: str, topic: str, keys: set[bytes], since_ms: int, *, timeout_s: float = 30.0
) -> set[bytes]:
    """The subset of ``keys`` found on ``topic`` in records from ``since_ms`` (minus a margin) on."""
    if not keys:
        return set()
    try:
        return await asyncio.wait_for(_scan(brokers, topic, keys, since_ms - CLOCK_MARGIN_MS), timeout_s)
    except (KafkaError, TimeoutError, OSError) as exc:
        msg = f"could not read {topic} on {brokers} to check for already published signals: {exc!r}"
        raise BrokerError(msg) from None


async def _scan(brokers: str, topic: str, keys: set[bytes], since_ms: int) -> set[bytes]:
    parts = await topic_partitions(brokers, topic)
    if not parts:
        return set()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=brokers,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        fetch_max_wait_ms=100,
    )
    await consumer.start()
    found: set[bytes] = set()
    try:
        consumer.assign(parts)
        starts = await consumer.offsets_for_times(dict.fromkeys(parts, max(since_ms, 0)))
        ends = await consumer.end_offsets(parts)
        todo = []
        for tp in parts:
            start = starts.get(tp)
            offset = start.offset if start is not None else ends[tp]
            if offset < ends[tp]:
                consumer.seek(tp, offset)
                todo.append(tp)
        scanned = 0
        while todo:
            batches = await consumer.getmany(*todo, timeout_ms=500)
            for records in batches.values():
                scanned += len(records)
                found.update(r.key for r in records if r.key in keys)
            todo = [tp for tp in todo if await consumer.position(tp) < ends[tp]]
        logger.info(
            "publish fence: %d of %d ids already on %s (%d records read)",
            len(found),
            len(keys),
            topic,
            scanned,
        )
        return found
    finally:
        await consumer.stop()
