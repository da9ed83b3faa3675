"""Read and write the compacted rules topic (record layout: :mod:`.registry`).

The topic has one partition by default (rule changes are rare and small);
records of one rule always go to the same partition whatever the count, so
offsets order its versions. Reads assign every partition without a consumer
group, start at the beginning and stop at the end offsets taken when the
read began.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Self

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from betrace.errors import BrokerError, ConfigError, RuleError
from betrace.rules.registry import Applied, RegistryState, RuleVersion, digest, encode, partition_for

logger = logging.getLogger(__name__)

#: Keep the newest record per key forever; keys are unique per version, so: every version.
TOPIC_CONFIG = {"cleanup.policy": "compact"}


def _broker_error(brokers: str, action: str, exc: BaseException) -> BrokerError:
    detail = str(exc) or type(exc).__name__
    msg = (
        f"cannot {action} on {brokers} ({detail}); start a broker with 'betrace dev up' "
        "or set BETRACE_BROKERS"
    )
    return BrokerError(msg)


async def ensure_rules_topic(
    brokers: str, topic: str, *, replication_factor: int = 1, timeout_s: float = 15.0
) -> bool:
    """Create the compacted rules topic if missing (True if created).

    An existing topic must use ``cleanup.policy=compact``: with the default
    ``delete`` policy, retention would silently erase old rules.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=brokers, request_timeout_ms=int(timeout_s * 1000))
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
    except (KafkaError, TimeoutError, OSError) as exc:
        raise _broker_error(brokers, "reach the Kafka broker", exc) from None
    try:
        if topic not in set(await admin.list_topics()):
            new = NewTopic(topic, 1, replication_factor, topic_configs=TOPIC_CONFIG)
            try:
                await admin.create_topics([new])
            except TopicAlreadyExistsError:
                pass  # another worker or CLI created it first
            else:
                logger.info("created compacted rules topic %s", topic)
                await _wait_for_leader(admin, topic, timeout_s)
                return True
        await _check_compacted(admin, topic)
    except (KafkaError, TimeoutError) as exc:
        raise _broker_error(brokers, f"create the rules topic {topic}", exc) from None
    finally:
        await admin.close()
    return False


async def _wait_for_leader(admin: AIOKafkaAdminClient, topic: str, timeout_s: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        [described] = await admin.describe_topics([topic])
        parts = described.get("partitions") or []
        if described.get("error_code", 0) == 0 and parts and all(p.get("leader", -1) >= 0 for p in parts):
            return
        await asyncio.sleep(0.1)
    msg = f"rules topic {topic} has no leader after {timeout_s:.0f}s"
    raise BrokerError(msg)


async def _check_compacted(admin: AIOKafkaAdminClient, topic: str) -> None:
    resource = ConfigResource(ConfigResourceType.TOPIC, topic, configs={"cleanup.policy": None})
    responses: list[Any] = await admin.describe_configs([resource])
    for response in responses:
        for resource_result in response.resources:
            # (error_code, error_message, resource_type, resource_name, config_entries)
            for entry in resource_result[4]:
                name, value = entry[0], entry[1]
                if name == "cleanup.policy" and "compact" not in str(value).split(","):
                    msg = (
                        f"rules topic {topic} has cleanup.policy={value}; it must be 'compact' or "
                        "retention deletes rules (kafka-configs --alter --add-config cleanup.policy=compact)"
                    )
                    raise ConfigError(msg)


class TopicReader:
    """Folds the rules topic into a :class:`RegistryState`: catch up, then follow."""

    def __init__(self, brokers: str, topic: str, state: RegistryState | None = None) -> None:
        self.brokers = brokers
        self.topic = topic
        self.state = state if state is not None else RegistryState()
        #: Raw records applied so far (for the worker's local cache), in offset order per partition.
        self.records: list[tuple[bytes | None, bytes | None]] = []
        self._consumer: AIOKafkaConsumer | None = None
        self._partitions: list[TopicPartition] = []

    async def open(self, timeout_s: float = 10.0, *, topic_wait_s: float = 0.0) -> None:
        """Connect and assign every partition; ``topic_wait_s`` covers a topic just created."""
        try:
            partitions = await asyncio.wait_for(self._partitions_of(topic_wait_s, timeout_s), timeout_s)
        except (KafkaError, TimeoutError, OSError) as exc:
            raise _broker_error(self.brokers, f"read the rules topic {self.topic}", exc) from None
        if not partitions:
            msg = f"rules topic {self.topic} does not exist on {self.brokers} yet"
            raise RuleError(msg)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.brokers,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            request_timeout_ms=int(max(timeout_s, 5.0) * 1000),
            fetch_max_wait_ms=200,
        )
        try:
            await asyncio.wait_for(consumer.start(), timeout_s)
            self._partitions = [TopicPartition(self.topic, p) for p in partitions]
            consumer.assign(self._partitions)
            await consumer.seek_to_beginning(*self._partitions)
        except (KafkaError, TimeoutError, OSError) as exc:
            await consumer.stop()
            raise _broker_error(self.brokers, f"read the rules topic {self.topic}", exc) from None
        self._consumer = consumer

    async def _partitions_of(self, wait_s: float, timeout_s: float) -> list[int]:
        # The admin API answers for any topic (a plain consumer's metadata only covers
        # topics it subscribed to); a topic created a moment ago may still be unknown.
        admin = AIOKafkaAdminClient(bootstrap_servers=self.brokers, request_timeout_ms=int(timeout_s * 1000))
        try:
            await admin.start()
            deadline = asyncio.get_running_loop().time() + wait_s
            while True:
                [described] = await admin.describe_topics([self.topic])
                partitions = [p["partition"] for p in described.get("partitions") or []]
                if partitions or asyncio.get_running_loop().time() >= deadline:
                    return sorted(partitions)
                await asyncio.sleep(0.1)
        finally:
            await admin.close()

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _require(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            msg = "TopicReader is not open"
            raise RuntimeError(msg)
        return self._consumer

    async def catch_up(self, timeout_s: float = 10.0) -> int:
        """Read up to the end offsets as of now; return how many new versions were applied."""
        consumer = self._require()
        try:
            return await asyncio.wait_for(self._read_to(consumer), timeout_s)
        except (KafkaError, TimeoutError) as exc:
            raise _broker_error(self.brokers, f"read the rules topic {self.topic}", exc) from None

    async def _read_to(self, consumer: AIOKafkaConsumer) -> int:
        ends = await consumer.end_offsets(self._partitions)
        new = 0
        while True:
            positions = [await consumer.position(tp) for tp in self._partitions]
            if all(pos >= ends[tp] for pos, tp in zip(positions, self._partitions, strict=True)):
                return new
            new += await self.poll(200)

    async def poll(self, timeout_ms: int) -> int:
        """Apply what arrives within ``timeout_ms``; return how many new versions."""
        batches = await self._require().getmany(timeout_ms=timeout_ms)
        new = 0
        for tp in sorted(batches, key=lambda t: t.partition):
            for record in batches[tp]:
                if self.state.apply_record(record.key, record.value) is Applied.NEW:
                    new += 1
                    self.records.append((record.key, record.value))
        return new


async def read_state(
    brokers: str, topic: str, timeout_s: float = 10.0, *, topic_wait_s: float = 0.0
) -> RegistryState:
    """The registry as of now (empty if the topic does not exist yet)."""
    reader = TopicReader(brokers, topic)
    try:
        await reader.open(timeout_s, topic_wait_s=topic_wait_s)
    except RuleError:
        return reader.state  # no topic: no rules yet
    try:
        await reader.catch_up(timeout_s)
    finally:
        await reader.close()
    return reader.state


async def publish(
    brokers: str, topic: str, versions: Sequence[RuleVersion], *, timeout_s: float = 15.0
) -> None:
    """Write ``versions`` (acks=all, idempotent producer); return once all are stored."""
    if not versions:
        return
    producer = AIOKafkaProducer(
        bootstrap_servers=brokers,
        acks="all",
        enable_idempotence=True,
        request_timeout_ms=int(timeout_s * 1000),
    )
    try:
        await asyncio.wait_for(producer.start(), timeout_s)
    except (KafkaError, TimeoutError, OSError) as exc:
        await producer.stop()
        raise _broker_error(brokers, "reach the Kafka broker", exc) from None
    try:
        count = len(await producer.partitions_for(topic))
        for version in versions:
            key, value = encode(version)
            partition = partition_for(version.rule.tenant, version.rule.id, count)
            await asyncio.wait_for(
                producer.send_and_wait(topic, value=value, key=key, partition=partition), timeout_s
            )
    except (KafkaError, TimeoutError) as exc:
        raise _broker_error(brokers, f"publish to the rules topic {topic}", exc) from None
    finally:
        await producer.stop()


async def commit(
    brokers: str,
    topic: str,
    make: Callable[[RegistryState], Sequence[RuleVersion]],
    *,
    replication_factor: int = 1,
    timeout_s: float = 15.0,
) -> list[RuleVersion]:
    """Read the registry, derive new versions with ``make``, publish and verify them.

    Verification re-reads the topic: if a concurrent writer published the
    same version of a rule first, ours lost (see :mod:`.registry`) and a
    :class:`RuleError` says so; nothing needs undoing, readers ignore ours.
    """
    await ensure_rules_topic(brokers, topic, replication_factor=replication_factor, timeout_s=timeout_s)
    state = await read_state(brokers, topic, timeout_s, topic_wait_s=timeout_s)
    versions = list(make(state))
    await publish(brokers, topic, versions, timeout_s=timeout_s)
    if not versions:
        return versions
    after = await read_state(brokers, topic, timeout_s)
    for version in versions:
        rule = version.rule
        if after.digest_of(rule.tenant, rule.id, rule.version) != digest(encode(version)[1]):
            msg = (
                f"conflict: another change created {rule.tenant}/{rule.id} v{rule.version} at the same "
                "time; yours was not applied. Check 'betrace rules history' and retry."
            )
            raise RuleError(msg)
    return versions
