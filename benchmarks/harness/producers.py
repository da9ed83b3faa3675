"""Rate-limited OTLP producer processes with ground truth.

Each producer process owns one aiokafka producer and a pool of pre-encoded
OTLP protobuf messages from :class:`betrace.workload.generator.TraceGenerator`.
Encoding is done before the clock starts, so the send loop only paces and
sends. A run longer than the pool replays it in *cycles*: before a message
is sent, the first 4 bytes of every trace id in it are overwritten with
``(producer, cycle)``, at byte offsets found once while encoding. Every cycle
therefore carries new traces (new trace ids, so nothing is deduplicated)
with the same content, and the expected signals of a cycle are the pool's
with the same prefix. That keeps a 5-minute soak at 150k spans/s within a
few hundred MB of producer memory.

Pacing is a token bucket per producer (``rate`` spans/s, burst ``burst_s``
seconds): a producer that falls behind by more than the burst loses those
tokens, so a shortfall shows as an achieved rate below the target instead of
being hidden by catch-up bursts.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from betrace.workload.generator import TraceGenerator, TraceSpec
from betrace.workload.otlp import encode_request


@dataclass(frozen=True)
class ProducerPlan:
    index: int
    brokers: str
    topic: str
    tenant_header: str
    tenants: tuple[str, ...]
    rate: float  # spans/s of this producer
    duration_s: float
    pool_spans: int
    spans_per_message: int
    violation_rate: float
    seed: int
    result_file: Path
    burst_s: float = 0.2
    max_in_flight: int = 1000


@dataclass
class PooledMessage:
    tenant: bytes
    value: bytes
    spans: int
    offsets: list[int]  # byte offsets of every trace id in value
    violations: list[tuple[str, str, str]]  # (tenant, rule, trace id hex without its first 8 chars)


@dataclass
class ProducerResult:
    index: int
    target_rate: float
    pool_spans: int
    pool_messages: int
    encode_s: float
    spans: int = 0
    messages: int = 0
    bytes: int = 0
    cycles: int = 0
    first_send: float = 0.0
    last_ack: float = 0.0
    cpu_s: float = 0.0
    tokens_dropped: float = 0.0
    error: str | None = None
    truth: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def achieved_rate(self) -> float:
        elapsed = self.last_ack - self.first_send
        return self.spans / elapsed if elapsed > 0 else 0.0


def build_pool(plan: ProducerPlan) -> list[PooledMessage]:
    """Encode ``pool_spans`` spans into messages of whole traces, one tenant per message."""
    gen = TraceGenerator(tenants=plan.tenants, violation_rate=plan.violation_rate, seed=plan.seed)
    pool: list[PooledMessage] = []
    pending: dict[str, list[TraceSpec]] = {}
    counts: dict[str, int] = {}

    def emit(tenant: str, traces: list[TraceSpec]) -> None:
        value = encode_request(traces).SerializeToString()
        offsets: list[int] = []
        violations: list[tuple[str, str, str]] = []
        for trace in traces:
            found, at = 0, value.find(trace.trace_id)
            while at >= 0:
                offsets.append(at)
                found += 1
                at = value.find(trace.trace_id, at + 16)
            if found != len(trace.spans):
                msg = f"trace id {trace.trace_id.hex()} found {found} times for {len(trace.spans)} spans"
                raise RuntimeError(msg)
            violations.extend((tenant, rule, trace.trace_id.hex()[8:]) for rule in trace.violates)
        pool.append(
            PooledMessage(tenant.encode(), value, sum(len(t.spans) for t in traces), offsets, violations)
        )

    for trace in gen.traces(plan.pool_spans):
        pending.setdefault(trace.tenant, []).append(trace)
        counts[trace.tenant] = counts.get(trace.tenant, 0) + len(trace.spans)
        if counts[trace.tenant] >= plan.spans_per_message:
            emit(trace.tenant, pending.pop(trace.tenant))
            counts.pop(trace.tenant)
    for tenant, traces in pending.items():
        emit(tenant, traces)
    return pool


def prefix_for(index: int, cycle: int) -> bytes:
    if cycle > 0xFFFF:
        msg = "more than 65,535 pool cycles; raise --pool-spans"
        raise RuntimeError(msg)
    return struct.pack(">HH", index + 1, cycle)


def patched(message: PooledMessage, prefix: bytes) -> bytes:
    buf = bytearray(message.value)
    for off in message.offsets:
        buf[off : off + 4] = prefix
    return bytes(buf)


async def _wait_for_start(go: Any) -> float:
    """The parent sets ``go`` (shared memory, no event loop) to the common start time."""
    while go.value == 0.0:  # noqa: ASYNC110 - a value in shared memory, not an asyncio event
        await asyncio.sleep(0.005)
    start: float = go.value
    await asyncio.sleep(max(0.0, start - time.time()))
    return start


async def _send_loop(
    plan: ProducerPlan, pool: list[PooledMessage], result: ProducerResult, shared: Any, go: Any
) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=plan.brokers,
        acks="all",
        linger_ms=5,
        max_batch_size=1024 * 1024,
        max_request_size=16 * 1024 * 1024,
    )
    await producer.start()
    header = plan.tenant_header
    in_flight: deque[asyncio.Future[Any]] = deque()

    def acked(spans: int, size: int) -> Any:
        def done(fut: asyncio.Future[Any]) -> None:
            if fut.cancelled() or fut.exception() is not None:
                if result.error is None:
                    result.error = repr(fut.exception()) if not fut.cancelled() else "cancelled"
                return
            result.spans += spans
            result.messages += 1
            result.bytes += size
            result.last_ack = time.time()
            shared[0] = result.spans
            shared[1] = result.messages

        return done

    try:
        start = await _wait_for_start(go)
        end = start + plan.duration_s
        rate = plan.rate
        burst = max(rate * plan.burst_s, 2.0 * plan.spans_per_message)
        tokens, last = 0.0, time.perf_counter()
        result.first_send = time.time()
        cycle = 0
        while time.time() < end and result.error is None:
            prefix = prefix_for(plan.index, cycle)
            hexprefix = prefix.hex()
            for message in pool:
                if time.time() >= end or result.error is not None:
                    break
                while True:
                    now = time.perf_counter()
                    tokens += (now - last) * rate
                    last = now
                    if tokens > burst:
                        result.tokens_dropped += tokens - burst
                        tokens = burst
                    if tokens >= message.spans:
                        break
                    await asyncio.sleep((message.spans - tokens) / rate)
                tokens -= message.spans
                value = patched(message, prefix)
                fut = await producer.send(plan.topic, value=value, headers=[(header, message.tenant)])
                fut.add_done_callback(acked(message.spans, len(value)))
                in_flight.append(fut)
                result.truth.extend((t, r, hexprefix + rest) for t, r, rest in message.violations)
                while len(in_flight) > plan.max_in_flight or (in_flight and in_flight[0].done()):
                    await asyncio.shield(in_flight.popleft())
            cycle += 1
        result.cycles = cycle
        await producer.flush()
        while in_flight:
            await in_flight.popleft()
    finally:
        await producer.stop()


def producer_main(plan: ProducerPlan, ready: Any, go: Any, shared: Any) -> None:
    """Process entry point: encode the pool, report ready, wait for ``go``, send, write the result."""
    t0 = time.perf_counter()
    pool = build_pool(plan)
    result = ProducerResult(
        index=plan.index,
        target_rate=plan.rate,
        pool_spans=sum(m.spans for m in pool),
        pool_messages=len(pool),
        encode_s=round(time.perf_counter() - t0, 2),
    )
    ready.set()
    cpu0 = time.process_time()
    try:
        asyncio.run(_send_loop(plan, pool, result, shared, go))
    except Exception as exc:  # reported to the parent through the result file
        result.error = f"{type(exc).__name__}: {exc}"
    result.cpu_s = round(time.process_time() - cpu0, 2)
    plan.result_file.write_text(json.dumps(asdict(result)), encoding="utf-8")


def read_result(path: Path) -> ProducerResult:
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc["truth"] = [tuple(t) for t in doc["truth"]]
    return ProducerResult(**doc)
