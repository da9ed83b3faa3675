"""Helpers for tests that drive real worker processes against the real broker."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from betrace.config import Settings
from betrace.dev.worker import WorkerProcess
from betrace.errors import BrokerError
from betrace.sinks.duckdb_store import TenantStore
from betrace.streams.admin import topic_partitions
from betrace.streams.lag import group_lag
from betrace.workload.otlp import OtlpMessage
from betrace.workload.producer import produce


def with_rules(cfg: Settings, tmp_path: Path, tenant_yaml: str, **update: Any) -> Settings:
    """``cfg`` reading its rules from one tenant file holding ``tenant_yaml``."""
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "acme.yaml").write_text(tenant_yaml)
    return cfg.model_copy(update={"rules_dir": rules, **update})


async def create_topic(brokers: str, topic: str, partitions: int = 1) -> None:
    """Create ``topic`` (the test brokers do not auto-create topics)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=brokers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()


def read_topic(cfg: Settings, topic: str, *, timeout_s: float = 60.0) -> list[Any]:
    """Every record currently in ``topic``: read up to the end offsets taken at the start.

    Stopping after a quiet spell instead would miss a partition whose first fetch
    is slow (a loaded machine), and report its records as lost.
    """

    async def run() -> list[Any]:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=cfg.brokers, enable_auto_commit=False, auto_offset_reset="earliest"
        )
        await consumer.start()
        records: list[Any] = []
        try:
            parts = await topic_partitions(cfg.brokers, topic)
            if not parts:
                return records
            consumer.assign(parts)
            ends = await consumer.end_offsets(parts)
            todo = [tp for tp in parts if ends[tp] > 0]
            deadline = time.monotonic() + timeout_s
            while todo:
                if time.monotonic() > deadline:
                    msg = f"{topic}: not read to its end offsets {ends} in {timeout_s}s"
                    raise AssertionError(msg)
                batch = await consumer.getmany(*todo, timeout_ms=300)
                for recs in batch.values():
                    records.extend(recs)
                todo = [tp for tp in todo if await consumer.position(tp) < ends[tp]]
        finally:
            await consumer.stop()
        return records

    return asyncio.run(run())


def signal_keys(cfg: Settings) -> list[tuple[str, str, str]]:
    return [
        (d["tenant"], d["rule_id"], d["trace_id"])
        for d in (orjson.loads(r.value) for r in read_topic(cfg, cfg.topics.signals))
    ]


def wait_until_drained(
    cfg: Settings, worker: WorkerProcess, timeout_s: float = 120.0, topics: list[str] | None = None
) -> None:
    """Until the worker's group has committed everything on every stage's input topic."""
    if topics is None:
        topics = [
            cfg.topics.input,
            cfg.topics.spans,
            cfg.topics.store,
            cfg.topics.traces,
            f"{cfg.topics.signals}.pending",
        ]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert worker.alive, worker.log_tail()
        try:
            lags = asyncio.run(group_lag(cfg.brokers, cfg.group_id, topics))
        except BrokerError:  # the group has no coordinator before the worker joins
            lags = []
        committed = bool(lags) and all(g.committed is not None and g.lag == 0 for g in lags if g.end > 0)
        # Committed is not done: traces restored from the changelog (their input was
        # committed at the checkpoint) may still be open, or a sink may still buffer.
        if committed and _idle(worker.dump_state()):
            return
        time.sleep(0.5)
    behind = [f"{g.topic}[{g.partition}] committed {g.committed} end {g.end}" for g in lags if g.lag]
    pytest.fail(
        f"pipeline did not drain in {timeout_s}s; behind: {behind}\n"
        f"{worker.log_tail()}\n{worker.dump_state()}"
    )


#: What a drained worker holds: nothing (lines of its SIGUSR1 state dump).
IDLE = ("live traces: 0", "span sink rows: 0", "signal sink items: 0")


def _idle(state: str) -> bool:
    return all(line in state for line in IDLE)


def run_worker_over(cfg: Settings, log: Path, messages: list[OtlpMessage]) -> None:
    asyncio.run(produce(cfg, messages))
    worker = WorkerProcess(cfg, log)
    worker.start()
    try:
        wait_until_drained(cfg, worker)
    finally:
        assert worker.stop() == 0, worker.log_tail()


def stored(cfg: Settings) -> dict[str, tuple[int, int]]:
    store = TenantStore(cfg.data_dir, read_only=True)
    try:
        return store.span_counts()
    finally:
        store.close()
