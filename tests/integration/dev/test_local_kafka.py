"""The local Kafka manager really runs Apache Kafka 4.x that aiokafka can use.

Starts its own clusters under ``tmp_path`` on non-default ports, so it does not
touch a developer's ``.dev/kafka`` cluster on 19092. The jar cache is shared
with the project (``<repo>/.cache/kafka``) so the jars are downloaded once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, NodeNotReadyError, RequestTimedOutError

from betrace.dev.kafka import LocalKafka

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[3]
JAR_CACHE = REPO_ROOT / ".cache" / "kafka"
PORT = 19192  # controller on 20192
PORT_3_NODES = 19292  # 19292-19294, controllers 20292-20294


@pytest.fixture
def kafka(tmp_path: Path) -> Iterator[LocalKafka]:
    local = LocalKafka(tmp_path, port=PORT, cache_dir=JAR_CACHE)
    try:
        yield local
    finally:
        local.down(clean=True)


@pytest.fixture
def kafka3(tmp_path: Path) -> Iterator[LocalKafka]:
    local = LocalKafka(tmp_path, brokers=3, port=PORT_3_NODES, cache_dir=JAR_CACHE)
    try:
        yield local
    finally:
        local.down(clean=True)


async def _ensure_topic(bootstrap: str, topic: str) -> None:
    """The dev broker does not auto-create topics: BeTrace creates each with its layout."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        if topic not in await admin.list_topics():
            nodes = len(bootstrap.split(","))
            await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=nodes)])
    finally:
        await admin.close()


async def _produce(bootstrap: str, topic: str, payload: bytes, *, retry_s: float = 60.0) -> int:
    """Produce one record once the admin client can reach the cluster.

    Until the controller fences a SIGKILLed broker (its session times out), the
    cluster metadata still lists it, and an admin client that picks it gets
    ``NodeNotReadyError``: retry that step, as a real client would. The send
    itself is not retried here (a retry could store the record twice).
    """
    deadline = time.monotonic() + retry_s
    while True:
        try:
            await _ensure_topic(bootstrap, topic)
            break
        except (NodeNotReadyError, KafkaConnectionError, RequestTimedOutError):
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(1.0)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        metadata = await producer.send_and_wait(topic, payload, key=b"key")
    finally:
        await producer.stop()
    return int(metadata.offset)


async def _consume_and_commit(bootstrap: str, topic: str, group: str) -> tuple[bytes, int]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), timeout=60)
        await consumer.commit()
        committed = await consumer.committed(TopicPartition(topic, record.partition))
    finally:
        await consumer.stop()
    return bytes(record.value), int(committed)


def _describe_row(output: str, group: str, topic: str) -> dict[str, str]:
    """The ``--describe`` table row of ``topic`` partition 0, keyed by header."""
    lines = [line.split() for line in output.splitlines() if line.strip()]
    header = next(cols for cols in lines if cols[:2] == ["GROUP", "TOPIC"])
    row = next(cols for cols in lines if cols[:3] == [group, topic, "0"])
    return dict(zip(header, row, strict=False))


def test_single_broker_produce_consume_describe_restart(kafka: LocalKafka, tmp_path: Path) -> None:
    topic, group = "betrace-dev-smoke", "betrace-dev-smoke-group"

    kafka.up()

    assert kafka.bootstrap_servers == f"127.0.0.1:{PORT}"
    [node] = kafka.status()
    assert node.running
    assert node.pid is not None
    assert node.node_id == 1
    assert node.port == PORT
    assert node.data_dir.is_relative_to(tmp_path / ".dev" / "kafka")
    assert (node.data_dir / "meta.properties").is_file()
    assert node.log_file.is_file()
    assert kafka.is_ready()

    started = time.monotonic()
    kafka.up()  # already up: a quick no-op
    assert time.monotonic() - started < 5
    assert kafka.status()[0].pid == node.pid

    assert asyncio.run(_produce(kafka.bootstrap_servers, topic, b"hello")) == 0
    value, committed = asyncio.run(_consume_and_commit(kafka.bootstrap_servers, topic, group))
    assert value == b"hello"
    assert committed == 1

    described = kafka.consumer_groups_describe(group)
    assert group in described
    assert topic in described
    row = _describe_row(described, group, topic)
    assert row["CURRENT-OFFSET"] == "1"
    assert row["LOG-END-OFFSET"] == "1"
    assert row["LAG"] == "0"

    # A restart keeps the cluster id, the data and the committed offsets.
    cluster_file = tmp_path / ".dev" / "kafka" / "cluster.json"
    cluster_id = json.loads(cluster_file.read_text())["cluster_id"]
    kafka.down()
    assert [s.running for s in kafka.status()] == [False]
    assert not (node.data_dir.parent / "kafka.pid").exists()
    kafka.up()
    assert json.loads(cluster_file.read_text())["cluster_id"] == cluster_id
    assert _describe_row(kafka.consumer_groups_describe(group), group, topic)["LAG"] == "0"
    assert asyncio.run(_produce(kafka.bootstrap_servers, topic, b"again")) == 1
    row = _describe_row(kafka.consumer_groups_describe(group), group, topic)
    assert row["LAG"] == "1"

    kafka.down(clean=True)
    assert not (tmp_path / ".dev" / "kafka").exists()
    assert not kafka.status()[0].running


@pytest.mark.slow
def test_three_node_quorum_survives_stop_kill_and_restart(kafka3: LocalKafka) -> None:
    topic = "betrace-dev-replicated"

    kafka3.up(timeout=120)

    statuses = kafka3.status()
    assert [s.node_id for s in statuses] == [1, 2, 3]
    assert all(s.running for s in statuses)
    assert [s.port for s in statuses] == [PORT_3_NODES, PORT_3_NODES + 1, PORT_3_NODES + 2]
    assert len({s.controller_port for s in statuses}) == 3
    assert asyncio.run(_produce(kafka3.bootstrap_servers, topic, b"one")) == 0

    kafka3.stop_node(2)  # graceful: controlled shutdown
    assert [s.running for s in kafka3.status()] == [True, False, True]
    assert not kafka3.is_ready()
    assert asyncio.run(_produce(kafka3.bootstrap_servers, topic, b"two")) == 1

    kafka3.start_node(2)
    kafka3.kill_node(3)  # crash
    assert [s.running for s in kafka3.status()] == [True, True, False]
    assert asyncio.run(_produce(kafka3.bootstrap_servers, topic, b"three")) == 2

    kafka3.start_node(3)
    assert kafka3.is_ready()
    value, committed = asyncio.run(
        _consume_and_commit(kafka3.bootstrap_servers, topic, "betrace-dev-3-group")
    )
    assert value == b"one"
    assert committed == 1


def test_a_node_killed_silently_during_startup_is_relaunched_once(tmp_path: Path) -> None:
    """A JVM SIGKILLed before it prints anything (as the OOM killer does on a
    busy CI host) is relaunched once instead of failing the whole ``up``."""
    local = LocalKafka(tmp_path, port=PORT, cache_dir=JAR_CACHE)
    pid_file = tmp_path / ".dev" / "kafka" / "node-1" / "kafka.pid"
    killed: list[int] = []

    def kill_first_jvm() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                pid = int(pid_file.read_text().strip())
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.002)

    killer = threading.Thread(target=kill_first_jvm, daemon=True)
    killer.start()
    try:
        local.up(timeout=120)
        killer.join(timeout=5)
        assert len(killed) == 1
        (status,) = local.status()
        assert status.running
        assert status.pid != killed[0]
        out = (tmp_path / ".dev" / "kafka" / "node-1" / "kafka.out").read_text()
        assert out.count(" starting: ") == 2
    finally:
        local.down(clean=True)
