"""A giant trace must not delay the verdicts of small traces (assembly fairness)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pyarrow.compute as pc
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from betrace.config import Settings
from betrace.dev.worker import WorkerProcess
from betrace.streams.codecs import ipc_to_table
from betrace.streams.lag import wait_until_stable
from betrace.workload.generator import SERVER, SpanSpec, TraceGenerator, TraceSpec
from betrace.workload.otlp import encode_request

GIANT_SPANS = 200_000
IDLE_S = 1.0


def giant_trace(spans: int) -> TraceSpec:
    root = b"\x01" * 8
    start = time.time_ns()
    rows = [
        SpanSpec(
            span_id=(i + 2).to_bytes(8, "big"),
            parent_span_id=root,
            name="batch.item",
            service="batch",
            kind=SERVER,
            start_ns=start + i,
            end_ns=start + i + 1000,
        )
        for i in range(spans)
    ]
    return TraceSpec("acme", b"\x0b" * 16, rows)


@pytest.mark.slow
def test_small_traces_close_on_time_while_a_giant_trace_streams(
    pipeline_settings: Settings, tmp_path: Path
) -> None:
    cfg = pipeline_settings.model_copy(update={"idle_timeout_s": IDLE_S})
    giant = giant_trace(GIANT_SPANS)
    giant_messages = [
        encode_request(
            [TraceSpec(giant.tenant, giant.trace_id, giant.spans[i : i + 2_000])]
        ).SerializeToString()
        for i in range(0, GIANT_SPANS, 2_000)
    ]
    small = list(TraceGenerator(tenants=("acme",), violation_rate=0.0, seed=4).traces(4_000))
    small_ids = {t.trace_id.hex() for t in small}
    worker = WorkerProcess(cfg, tmp_path / "worker.log")
    worker.start()
    try:
        assert asyncio.run(wait_until_stable(cfg.brokers, cfg.group_id, timeout_s=120)), worker.log_tail()
        delays = asyncio.run(_stream_and_measure(cfg, giant_messages, small, small_ids))
    finally:
        assert worker.stop() == 0, worker.log_tail()
    assert set(delays) == small_ids, "every small trace must be closed"
    worst = max(delays.values())
    # Closed within the idle timeout + 1 s of its last span, although the giant trace
    # (100 messages of 2,000 spans) streamed in over the same seconds. Measured on the
    # AMD EPYC VM: at ~40k spans/s p50 1.92 s, max 3.03 s (20cacbf fails as well); at
    # ~20k spans/s p50 1.40-1.44 s, max 1.77-2.00 s.
    assert worst <= IDLE_S + 1.0, f"slowest small trace closed {worst:.2f}s after its last span"


async def _stream_and_measure(
    cfg: Settings, giant: list[bytes], small: list[TraceSpec], small_ids: set[str]
) -> dict[str, float]:
    producer = AIOKafkaProducer(bootstrap_servers=cfg.brokers, linger_ms=5, max_request_size=16 * 1024 * 1024)
    consumer = AIOKafkaConsumer(
        cfg.topics.traces, bootstrap_servers=cfg.brokers, auto_offset_reset="earliest"
    )
    await producer.start()
    await consumer.start()
    headers = [(cfg.tenant_header, b"acme")]
    try:
        # Interleave: every giant message is followed by a few small traces, over ~15 s
        # (~13k spans/s). Faster, a single worker on the 2-core VM is saturated and every
        # trace waits, giant or not: that measures throughput (issue #10), not fairness.
        per_giant = max(1, len(small) // len(giant))
        for i, blob in enumerate(giant):
            await producer.send(cfg.topics.input, blob, headers=headers)
            for trace in small[i * per_giant : (i + 1) * per_giant]:
                await producer.send(
                    cfg.topics.input, encode_request([trace]).SerializeToString(), headers=headers
                )
            await asyncio.sleep(0.15)
        for trace in small[len(giant) * per_giant :]:
            await producer.send(
                cfg.topics.input, encode_request([trace]).SerializeToString(), headers=headers
            )
        await producer.flush()
        delays: dict[str, float] = {}
        deadline = time.monotonic() + 120
        while set(delays) != small_ids and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    table = ipc_to_table(record.value)
                    last = table.group_by("trace_id").aggregate([("produced_ms", "max")])
                    mask = pc.is_in(
                        last.column("trace_id"), value_set=pc.unique(pc.cast(list(small_ids), "string"))
                    )
                    for trace_id, produced in zip(
                        last.filter(mask).column("trace_id").to_pylist(),
                        last.filter(mask).column("produced_ms_max").to_pylist(),
                        strict=True,
                    ):
                        delays[trace_id] = (record.timestamp - produced) / 1000
        return delays
    finally:
        await producer.stop()
        await consumer.stop()
