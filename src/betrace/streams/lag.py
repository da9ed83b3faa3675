"""Consumer lag: committed offset, end offset and lag per partition of a group."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaConnectionError, KafkaError

from betrace.errors import BrokerError


@dataclass(frozen=True, slots=True)
class PartitionLag:
    group: str
    topic: str
    partition: int
    committed: int | None
    end: int

    @property
    def lag(self) -> int:
        """Unconsumed records; with no commit yet, everything is lag."""
        return self.end - (self.committed if self.committed is not None and self.committed >= 0 else 0)


async def group_lag(brokers: str, group: str, topics: list[str]) -> list[PartitionLag]:
    """Lag of ``group`` on every partition of ``topics``."""
    admin = AIOKafkaAdminClient(bootstrap_servers=brokers)
    consumer = AIOKafkaConsumer(bootstrap_servers=brokers, group_id=None, enable_auto_commit=False)
    try:
        await asyncio.wait_for(asyncio.gather(admin.start(), consumer.start()), 30)
        partitions = [
            TopicPartition(topic, p)
            for topic in topics
            for p in sorted(consumer.partitions_for_topic(topic) or await _partitions(consumer, topic))
        ]
        committed = await admin.list_consumer_group_offsets(group, partitions=partitions)
        ends = await consumer.end_offsets(partitions)
    except (KafkaConnectionError, TimeoutError, OSError) as exc:
        msg = f"cannot reach Kafka at {brokers}: {exc}"
        raise BrokerError(msg) from None
    except KafkaError as exc:
        msg = f"cannot read offsets of group {group!r}: {exc}"
        raise BrokerError(msg) from exc
    finally:
        await asyncio.gather(admin.close(), consumer.stop(), return_exceptions=True)
    out = []
    for tp in partitions:
        meta = committed.get(tp)
        out.append(PartitionLag(group, tp.topic, tp.partition, meta.offset if meta else None, ends[tp]))
    return out


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    await consumer._client.force_metadata_update()
    return consumer.partitions_for_topic(topic) or set()
