"""Consumer lag: committed offset, end offset and lag per partition of a group.

The figures are the ones Apache Kafka's ``kafka-consumer-groups --describe``
prints: ``LAG = LOG-END-OFFSET - CURRENT-OFFSET`` for partitions with a
commit. A partition the group never committed has no current offset; its
lag is counted from the log start (everything is unconsumed).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
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

    def as_dict(self) -> dict[str, int | str | None]:
        """The JSON shape shared by ``betrace lag --json`` and ``/v1/stats``."""
        return {
            "topic": self.topic,
            "partition": self.partition,
            "committed": self.committed,
            "end": self.end,
            "lag": self.lag,
        }


class LagReader:
    """Long-lived admin and metadata clients for repeated lag reads."""

    def __init__(self, brokers: str, *, timeout_s: float = 30.0) -> None:
        self.brokers = brokers
        self.timeout_s = timeout_s
        self._admin: AIOKafkaAdminClient | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        # aiokafka clients bind to the running loop, so they are made here, not in __init__.
        timeout_ms = int(self.timeout_s * 1000)
        self._admin = AIOKafkaAdminClient(bootstrap_servers=self.brokers, request_timeout_ms=timeout_ms)
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.brokers,
            group_id=None,
            enable_auto_commit=False,
            request_timeout_ms=timeout_ms,
        )
        try:
            await asyncio.wait_for(
                asyncio.gather(self._admin.start(), self._consumer.start()), self.timeout_s
            )
        except (KafkaConnectionError, TimeoutError, OSError) as exc:
            await self.stop()
            msg = f"cannot reach Kafka at {self.brokers}: {exc}"
            raise BrokerError(msg) from None

    async def stop(self) -> None:
        admin, consumer = self._admin, self._consumer
        self._admin = self._consumer = None
        if admin is not None and consumer is not None:
            await asyncio.gather(admin.close(), consumer.stop(), return_exceptions=True)

    def _clients(self) -> tuple[AIOKafkaAdminClient, AIOKafkaConsumer]:
        if self._admin is None or self._consumer is None:
            msg = "LagReader.start() was not called"
            raise BrokerError(msg)
        return self._admin, self._consumer

    async def groups(self, prefix: str = "") -> list[str]:
        """Consumer groups known to the cluster whose id starts with ``prefix``."""
        admin, _ = self._clients()
        try:
            listed = await admin.list_consumer_groups()
        except KafkaError as exc:
            msg = f"cannot list consumer groups: {exc}"
            raise BrokerError(msg) from exc
        return sorted(g[0] for g in listed if g[0].startswith(prefix))

    async def state(self, group: str) -> str | None:
        """The group's coordinator state (``Stable``, ``PreparingRebalance``, …), None if unknown."""
        admin, _ = self._clients()
        try:
            responses = await admin.describe_consumer_groups([group])
        except KafkaError as exc:
            msg = f"cannot describe group {group!r}: {exc}"
            raise BrokerError(msg) from exc
        for response in responses:
            for described in response.to_object().get("groups", []):
                if described.get("group") == group and described.get("error_code") == 0:
                    state: str = described.get("state") or ""
                    return state or None
        return None

    async def lag(self, group: str, topics: Iterable[str] | None = None) -> list[PartitionLag]:
        """Lag of ``group`` on ``topics`` (default: every topic it has committed on)."""
        admin, consumer = self._clients()
        try:
            if topics is None:
                committed = await admin.list_consumer_group_offsets(group)
                partitions = sorted(committed, key=lambda tp: (tp.topic, tp.partition))
            else:
                partitions = [
                    TopicPartition(topic, p)
                    for topic in topics
                    for p in sorted(await self._partitions(topic))
                ]
                committed = await admin.list_consumer_group_offsets(group, partitions=partitions)
            ends = await consumer.end_offsets(partitions) if partitions else {}
        except (KafkaConnectionError, TimeoutError, OSError) as exc:
            msg = f"cannot reach Kafka at {self.brokers}: {exc}"
            raise BrokerError(msg) from None
        except KafkaError as exc:
            msg = f"cannot read offsets of group {group!r}: {exc}"
            raise BrokerError(msg) from exc
        out = []
        for tp in partitions:
            meta = committed.get(tp)
            offset = meta.offset if meta is not None and meta.offset >= 0 else None
            out.append(PartitionLag(group, tp.topic, tp.partition, offset, ends[tp]))
        return out

    async def _partitions(self, topic: str) -> set[int]:
        _, consumer = self._clients()
        known = consumer.partitions_for_topic(topic)
        if not known:
            await consumer._client.force_metadata_update()
            known = consumer.partitions_for_topic(topic)
        return known or set()


async def group_lag(brokers: str, group: str, topics: list[str] | None = None) -> list[PartitionLag]:
    """One-shot lag read of ``group``."""
    reader = LagReader(brokers)
    await reader.start()
    try:
        return await reader.lag(group, topics)
    finally:
        await reader.stop()


async def wait_until_stable(brokers: str, group: str, timeout_s: float = 60.0) -> bool:
    """Wait until ``group`` has joined and holds its assignment (coordinator state ``Stable``)."""
    reader = LagReader(brokers)
    await reader.start()
    try:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while asyncio.get_running_loop().time() < deadline:
            try:
                if await reader.state(group) == "Stable":
                    return True
            except BrokerError:
                pass  # no coordinator for the group yet
            await asyncio.sleep(0.2)
        return False
    finally:
        await reader.stop()
