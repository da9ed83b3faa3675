"""Create the topics a worker needs, and check that the broker answers."""

from __future__ import annotations

import asyncio
import logging

from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError

from betrace.config import Settings
from betrace.errors import BrokerError
from betrace.streams.topics import topic_specs

logger = logging.getLogger(__name__)

#: Internal topics carry Arrow batches of many spans.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


async def ensure_topics(settings: Settings, *, timeout_s: float = 30.0) -> list[str]:
    """Create missing topics; return the names created. Fail clearly if the broker is down."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.brokers, request_timeout_ms=int(timeout_s * 1000))
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
    except (KafkaConnectionError, TimeoutError, OSError) as exc:
        msg = (
            f"cannot reach the Kafka broker at {settings.brokers} ({type(exc).__name__}: {exc}); "
            "start one with 'betrace dev up' or set BETRACE_BROKERS"
        )
        raise BrokerError(msg) from None
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(
                spec.name,
                num_partitions=spec.partitions,
                replication_factor=settings.topics.replication_factor,
                topic_configs={"max.message.bytes": str(MAX_MESSAGE_BYTES), **spec.config},
            )
            for spec in topic_specs(settings)
            if spec.name not in existing
        ]
        if wanted:
            await admin.create_topics(wanted)
            logger.info("created topics %s", ", ".join(t.name for t in wanted))
            await _wait_for_leaders(admin, [t.name for t in wanted], timeout_s)
        return [t.name for t in wanted]
    except KafkaError as exc:
        msg = f"cannot create topics on {settings.brokers}: {exc}"
        raise BrokerError(msg) from exc
    finally:
        await admin.close()


async def _wait_for_leaders(admin: AIOKafkaAdminClient, topics: list[str], timeout_s: float) -> None:
    """New partitions answer NotLeader until elected; wait so first produces succeed."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        described = await admin.describe_topics(topics)
        ready = all(
            t.get("error_code", 0) == 0
            and t.get("partitions")
            and all(p.get("leader", -1) >= 0 for p in t["partitions"])
            for t in described
        )
        if ready:
            return
        if asyncio.get_running_loop().time() > deadline:
            msg = f"topics {', '.join(topics)} have no leader after {timeout_s:.0f}s"
            raise BrokerError(msg)
        await asyncio.sleep(0.1)


async def topic_partitions(brokers: str, topic: str) -> list[TopicPartition]:
    """Every partition of ``topic`` (none when it does not exist)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=brokers)
    try:
        await admin.start()
        [described] = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return [TopicPartition(topic, p["partition"]) for p in described.get("partitions") or []]
