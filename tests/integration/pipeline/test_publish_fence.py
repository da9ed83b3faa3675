"""A signal published before a crash, but never marked emitted, is not published again."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from betrace.config import Settings
from betrace.metrics import InMemoryHooks
from betrace.sinks.duckdb_store import TenantStore
from betrace.sinks.signals import SignalSink
from betrace.streams.admin import ensure_topics
from betrace.streams.published import published_keys
from tests.integration.helpers import read_topic

pytestmark = pytest.mark.integration


def _signal(n: int) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "signal_id": f"{n:032x}",
        "tenant": "acme",
        "rule_id": "pii-audit",
        "rule_version": 1,
        "rule_name": "pii-audit",
        "trace_id": f"{n + 1000:032x}",
        "span_ids": ["a1"],
        "severity": "high",
        "message": "pii.access without audit.log",
        "detected_at": "2026-11-25T05:00:00.000Z",
        "source_produced_ms": 0,
    }


class CrashError(Exception):
    """Stands for the process dying right after the broker acknowledged the signals."""


def test_a_signal_published_before_a_crash_is_marked_not_republished(
    pipeline_settings: Settings, tmp_path: Path
) -> None:
    cfg = pipeline_settings
    topic = cfg.topics.signals

    async def run() -> None:
        await ensure_topics(cfg)
        producer = AIOKafkaProducer(bootstrap_servers=cfg.brokers, acks="all")
        await producer.start()
        published: list[str] = []

        async def publish(docs: list[dict[str, Any]]) -> None:
            for doc in docs:
                await producer.send_and_wait(topic, key=doc["signal_id"].encode(), value=orjson.dumps(doc))
                published.append(doc["signal_id"])

        async def fence(suspects: dict[str, int]) -> set[str]:
            since_ms = min(suspects.values()) // 1_000_000
            found = await published_keys(cfg.brokers, topic, {k.encode() for k in suspects}, since_ms)
            return {k.decode() for k in found}

        async def publish_then_crash(docs: list[dict[str, Any]]) -> None:
            await publish(docs[:2])  # two reach the broker, then the worker dies
            raise CrashError

        store = TenantStore(tmp_path / "data")
        try:
            first = SignalSink(store, publish_then_crash, max_items=100, hooks=InMemoryHooks(), fence=fence)
            with pytest.raises(CrashError):
                await first.write_now([_signal(n) for n in range(3)])
            # The next worker gets the same candidates again (nothing was committed).
            second = SignalSink(store, publish, max_items=100, hooks=InMemoryHooks(), fence=fence)
            await second.write_now([_signal(n) for n in range(3)])
            assert second.emitted == 1  # only the one that never reached the topic
            # And a replay after the mark publishes nothing and scans nothing.
            await second.write_now([_signal(n) for n in range(3)])
            assert second.emitted == 1
        finally:
            store.close()
            await producer.stop()
        assert sorted(published) == [f"{n:032x}" for n in range(3)]

    asyncio.run(run())
    keys = sorted(r.key.decode() for r in read_topic(cfg, topic))
    assert keys == [f"{n:032x}" for n in range(3)]  # each exactly once
