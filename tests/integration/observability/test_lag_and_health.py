"""Lag figures agree with Kafka's own tool; a real worker serves metrics and health."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import OffsetAndMetadata
from typer.testing import CliRunner

from betrace.cli.main import app as cli
from betrace.config import Settings
from betrace.dev.kafka import LocalKafka
from betrace.dev.worker import WorkerProcess
from betrace.streams.lag import group_lag
from betrace.workload.generator import TraceGenerator
from betrace.workload.otlp import batch_messages
from betrace.workload.producer import produce
from tests.integration.helpers import create_topic


def _prepare_group(brokers: str, topic: str, group: str) -> None:
    """Three partitions: one fully consumed, one half, one never committed."""

    async def run() -> None:
        await create_topic(brokers, topic, partitions=3)
        producer = AIOKafkaProducer(bootstrap_servers=brokers)
        await producer.start()
        try:
            for partition, count in ((0, 10), (1, 20), (2, 7)):
                for i in range(count):
                    await producer.send(topic, f"m{i}".encode(), partition=partition)
            await producer.flush()
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(bootstrap_servers=brokers, group_id=group, enable_auto_commit=False)
        await consumer.start()
        try:
            consumer.assign([TopicPartition(topic, p) for p in range(3)])
            await consumer.commit(
                {
                    TopicPartition(topic, 0): OffsetAndMetadata(10, ""),
                    TopicPartition(topic, 1): OffsetAndMetadata(5, ""),
                }
            )
        finally:
            await consumer.stop()

    asyncio.run(run())


def _parse_describe(text: str, topic: str) -> dict[int, tuple[int | None, int, int | None]]:
    """partition -> (CURRENT-OFFSET, LOG-END-OFFSET, LAG) from kafka-consumer-groups --describe."""
    rows = {}
    for line in text.splitlines():
        cols = line.split()
        if len(cols) >= 6 and cols[1] == topic and cols[2].isdigit():

            def num(v: str) -> int | None:
                return None if v == "-" else int(v)

            rows[int(cols[2])] = (num(cols[3]), int(cols[4]), num(cols[5]))
    return rows


def test_lag_matches_kafka_consumer_groups(local_kafka: LocalKafka | None, kafka_brokers: str) -> None:
    if local_kafka is None:
        pytest.skip(
            "Kafka's own tool runs from the local broker's jars; not available with BETRACE_TEST_BROKERS"
        )
    topic, group = "lagcheck-topic", "lagcheck-group"
    _prepare_group(kafka_brokers, topic, group)
    ours = {p.partition: p for p in asyncio.run(group_lag(kafka_brokers, group, [topic]))}
    theirs = _parse_describe(local_kafka.consumer_groups_describe(group), topic)
    assert set(theirs) == {0, 1}  # Kafka lists only partitions the group committed
    for partition, (current, end, lag) in theirs.items():
        assert ours[partition].committed == current
        assert ours[partition].end == end
        assert ours[partition].lag == lag
    assert ours[2].committed is None  # never committed: all of it is lag
    assert ours[2].lag == 7

    result = CliRunner().invoke(cli, ["lag", group, "--json"], env={"BETRACE_BROKERS": kafka_brokers})
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    (entry,) = doc["groups"]
    assert entry["group"] == group
    assert entry["total_lag"] == 0 + 15  # committed partitions only: lag by --describe's definition
    assert {p["partition"]: p["lag"] for p in entry["partitions"]} == {0: 0, 1: 15}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, ConnectionError):
        return 0, b""  # not listening yet


def _wait_for(fn: Any, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail("condition not met in time")


def test_worker_serves_metrics_health_and_stats(pipeline_settings: Settings, tmp_path: Path) -> None:
    port = _free_port()
    cfg = pipeline_settings.model_copy(update={"web_port": port, "lag_interval_s": 1.0})
    worker = WorkerProcess(cfg, tmp_path / "worker.log")
    worker.start()
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_for(
            lambda: _get(base + "/health/live")[0] == 200 if worker.alive else pytest.fail(worker.log_tail())
        )
        _, body = _wait_for(lambda: (r := _get(base + "/health/ready"))[0] == 200 and r)
        ready = json.loads(body)
        assert ready["ready"] is True
        assert {"broker", "partitions", "data_dir", "consumer_lag"} <= set(ready["checks"])

        gen = TraceGenerator(tenants=("acme",), violation_rate=0.5, seed=9)
        asyncio.run(produce(cfg, list(batch_messages(gen.traces(2_000)))))

        def spans_counted() -> bool:
            text = _get(base + "/metrics")[1].decode()
            match = re.search(r'^betrace_spans_in_total\{stage="ingest"\} (\S+)$', text, re.M)
            return bool(match) and float(match.group(1)) >= gen.truth.spans

        _wait_for(spans_counted)
        metrics = _get(base + "/metrics")[1].decode()
        for name in (
            "betrace_consumer_lag",
            "betrace_process_resident_memory_bytes",
            "betrace_live_traces",
            'betrace_batch_size_count{stage="ingest"}',
        ):
            assert name in metrics

        def signal_latency_observed() -> bool:
            text = _get(base + "/metrics")[1].decode()
            return 'betrace_produce_to_signal_seconds_count{tenant="acme"}' in text

        _wait_for(signal_latency_observed)
        assert "trace_id" not in metrics  # no trace ids in labels
        stats = json.loads(_get(base + "/v1/stats")[1])
        assert stats["consumer_lag"]["group"] == cfg.app_id
        assert "betrace_spans_in" in stats["metrics"]
    finally:
        assert worker.stop() == 0, worker.log_tail()
