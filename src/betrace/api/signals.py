"""Read signals from the signals topic."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaConnectionError

from betrace.config import Settings
from betrace.errors import BrokerError, DecodeError
from betrace.streams.codecs import loads

logger = logging.getLogger(__name__)


async def tail_signals(
    settings: Settings,
    on_signal: Callable[[dict[str, Any]], None],
    *,
    from_beginning: bool = False,
    max_signals: int | None = None,
    timeout_s: float | None = None,
    idle_exit_s: float | None = None,
    stop: Callable[[], bool] | None = None,
) -> int:
    """Call ``on_signal`` for each signal; return how many were seen.

    Ends after ``max_signals``, after ``timeout_s`` in total, after
    ``idle_exit_s`` without a new signal, or when ``stop()`` turns true.
    """
    consumer = AIOKafkaConsumer(
        settings.topics.signals,
        bootstrap_servers=settings.brokers,
        group_id=None,
        auto_offset_reset="earliest" if from_beginning else "latest",
        enable_auto_commit=False,
    )
    try:
        await asyncio.wait_for(consumer.start(), 30)
    except (KafkaConnectionError, TimeoutError, OSError) as exc:
        msg = f"cannot reach Kafka at {settings.brokers}: {exc}; start one with 'betrace dev up'"
        raise BrokerError(msg) from None
    seen = 0
    started = last = time.monotonic()
    try:
        while True:
            batches = await consumer.getmany(timeout_ms=200, max_records=1000)
            now = time.monotonic()
            for records in batches.values():
                for record in records:
                    try:
                        doc = loads(record.value or b"")
                    except DecodeError as exc:
                        logger.warning("skipping a malformed signal at offset %d: %s", record.offset, exc)
                        continue
                    seen += 1
                    last = now
                    on_signal(doc)
                    if max_signals is not None and seen >= max_signals:
                        return seen
            if timeout_s is not None and now - started >= timeout_s:
                return seen
            if idle_exit_s is not None and now - last >= idle_exit_s:
                return seen
            if stop is not None and stop():
                return seen
    finally:
        await consumer.stop()
