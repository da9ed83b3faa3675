"""Produce OTLP messages to Kafka with aiokafka, as the Collector's exporter would."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError

from betrace.config import Settings
from betrace.errors import BrokerError
from betrace.workload.otlp import OtlpMessage

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ProduceStats:
    messages: int = 0
    spans: int = 0
    bytes: int = 0
    seconds: float = 0.0

    @property
    def spans_per_s(self) -> float:
        return self.spans / self.seconds if self.seconds else 0.0


async def produce(
    settings: Settings,
    messages: Iterable[OtlpMessage],
    *,
    topic: str | None = None,
    encoding: str | None = None,
    on_progress: Callable[[int], None] | None = None,
    max_in_flight: int = 2_000,
) -> ProduceStats:
    """Send ``messages``; the tenant goes into the configured tenant header."""
    target = topic or settings.topics.input
    if (encoding or settings.topics.input_encoding) != "otlp_proto":
        msg = "the synthetic producer writes otlp_proto only"
        raise ValueError(msg)
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.brokers,
        acks="all",
        linger_ms=5,
        max_batch_size=1024 * 1024,
        max_request_size=16 * 1024 * 1024,
        compression_type=None,
    )
    try:
        await asyncio.wait_for(producer.start(), 30)
    except (KafkaConnectionError, TimeoutError, OSError) as exc:
        msg = f"cannot reach Kafka at {settings.brokers}: {exc}; start one with 'betrace dev up'"
        raise BrokerError(msg) from None
    stats = ProduceStats()
    started = time.perf_counter()
    pending: list[asyncio.Future[object]] = []
    try:
        for message in messages:
            fut = await producer.send(
                target,
                value=message.value,
                key=message.key,
                headers=[(settings.tenant_header, message.tenant.encode())],
            )
            pending.append(fut)
            stats.messages += 1
            stats.spans += message.spans
            stats.bytes += len(message.value)
            if on_progress is not None:
                on_progress(message.spans)
            if len(pending) >= max_in_flight:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    except KafkaError as exc:
        msg = f"producing to {target} failed: {exc}"
        raise BrokerError(msg) from exc
    finally:
        await producer.stop()
    stats.seconds = time.perf_counter() - started
    return stats
