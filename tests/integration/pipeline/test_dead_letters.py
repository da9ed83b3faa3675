"""Bad input goes to the dead-letter topic with its reason; nothing else is lost."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiokafka import AIOKafkaProducer

from betrace.config import Settings
from betrace.dev.worker import WorkerProcess
from betrace.streams.topics import DLQ_OFFSET, DLQ_PARTITION, DLQ_REASON, DLQ_TOPIC
from betrace.workload.generator import TraceGenerator
from betrace.workload.otlp import encode_request
from tests.integration.helpers import read_topic, stored, wait_until_drained


def test_poison_messages_are_dead_lettered_and_the_rest_flows(
    pipeline_settings: Settings, tmp_path: Path
) -> None:
    cfg = pipeline_settings
    gen = TraceGenerator(tenants=("acme",), violation_rate=0.0, seed=5)
    traces = list(gen.traces(400))
    good = encode_request(traces[: len(traces) // 2]).SerializeToString()
    # One span with an all-zero span id, among valid spans of other traces.
    mixed_traces = traces[len(traces) // 2 :]
    mixed_traces[0].spans[0].span_id = b"\x00" * 8
    mixed = encode_request(mixed_traces).SerializeToString()
    valid_in_mixed = sum(len(t.spans) for t in mixed_traces) - 1
    garbage = b"\x0a\xff\xff\xff\xff\x0fnot protobuf"
    headers = [(cfg.tenant_header, b"acme")]

    async def send() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=cfg.brokers)
        await producer.start()
        try:
            await producer.send_and_wait(cfg.topics.input, garbage, headers=headers, partition=0)
            await producer.send_and_wait(cfg.topics.input, good, headers=headers, partition=0)
            await producer.send_and_wait(cfg.topics.input, mixed, headers=headers, partition=0)
            await producer.send_and_wait(
                cfg.topics.input, good, key=b"not-a-trace-id", headers=headers, partition=0
            )
            await producer.send_and_wait(
                cfg.topics.input, good, headers=[(cfg.tenant_header, b"../etc")], partition=0
            )
        finally:
            await producer.stop()

    asyncio.run(send())
    worker = WorkerProcess(cfg, tmp_path / "worker.log")
    worker.start()
    try:
        wait_until_drained(cfg, worker)
        assert worker.alive, "a poison message must not stop the worker"
    finally:
        assert worker.stop() == 0

    dead = read_topic(cfg, cfg.topics.dlq)
    by_offset = {int(dict(r.headers)[DLQ_OFFSET]): r for r in dead}
    assert sorted(by_offset) == [0, 2, 3, 4]
    reasons = {o: dict(r.headers)[DLQ_REASON].decode() for o, r in by_offset.items()}
    assert reasons == {0: "invalid_value", 2: "invalid_span", 3: "invalid_key", 4: "invalid_value"}
    for offset, record in by_offset.items():
        head = dict(record.headers)
        assert head[DLQ_TOPIC].decode() == cfg.topics.input
        assert head[DLQ_PARTITION] == b"0"
        assert head[cfg.tenant_header] in (b"acme", b"../etc")  # original headers kept
        assert record.value == {0: garbage, 2: mixed, 3: good, 4: good}[offset]  # original bytes
    # The good message and the valid spans of the mixed one were stored.
    good_spans = sum(len(t.spans) for t in traces[: len(traces) // 2])
    assert stored(cfg) == {"acme": (good_spans + valid_in_mixed,) * 2}
