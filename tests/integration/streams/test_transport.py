"""faust transport fixes: never-committed partitions rewind; the producer is idempotent."""

from __future__ import annotations

import asyncio
import uuid

import faust
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from betrace.streams.transport import (
    IdempotentProducer,
    SeekingConsumer,
    install,
    seek_to_committed_or_beginning,
)
from tests.integration.helpers import create_topic

pytestmark = pytest.mark.integration


@pytest.mark.asyncio
async def test_never_committed_partitions_go_back_to_their_start(kafka_brokers: str) -> None:
    topic, group = f"seek-{uuid.uuid4().hex[:8]}", f"seek-group-{uuid.uuid4().hex[:8]}"
    await create_topic(kafka_brokers, topic, partitions=2)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_brokers)
    await producer.start()
    try:
        for i in range(5):
            for p in (0, 1):
                await producer.send_and_wait(topic, f"{i}".encode(), partition=p)
    finally:
        await producer.stop()
    never, committed = TopicPartition(topic, 0), TopicPartition(topic, 1)
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_brokers, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([never, committed])
        await consumer.commit({committed: 3})
        # The position a worker has after records fetched while paused were discarded.
        await consumer.seek_to_end(never, committed)
        assert await consumer.position(never) == 5
        # aiokafka's own seek leaves the never-committed partition at its end: 5 records lost.
        await consumer.seek_to_committed()
        assert await consumer.position(never) == 5
        offsets = await seek_to_committed_or_beginning(consumer)
        assert offsets[committed] == 3 and offsets[never] is None
        assert await consumer.position(never) == 0
        assert await consumer.position(committed) == 3
    finally:
        await consumer.stop()


@pytest.mark.asyncio
async def test_the_app_producer_is_idempotent_on_a_real_broker(kafka_brokers: str) -> None:
    app = faust.App(f"transport-{uuid.uuid4().hex[:8]}", broker=f"kafka://{kafka_brokers}", producer_acks=1)
    install(app)
    assert app.transport.Consumer is SeekingConsumer
    producer = app.producer
    assert isinstance(producer, IdempotentProducer)
    topic = f"transport-{uuid.uuid4().hex[:8]}"
    await create_topic(kafka_brokers, topic)
    client = producer._new_producer()
    await client.start()
    try:
        await asyncio.wait_for(client.send_and_wait(topic, b"x"), timeout=60)
        # The broker handed out a producer id: retried batches carry sequence numbers it dedupes.
        assert client._txn_manager is not None
        assert client._txn_manager.producer_id >= 0
    finally:
        await client.stop()
