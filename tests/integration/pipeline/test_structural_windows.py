"""Structural TraceQL through the real pipeline: a parent that arrives windows after its children.

OpenTelemetry exports a parent span after its children, so the root of a long
trace arrives last. The worker cuts the trace into 20-span windows; the root
and the ``db`` span it is an ancestor of are more than ten windows apart, and
the verdict still matches the whole trace's.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import orjson
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from betrace.config import Settings
from betrace.dev.worker import WorkerProcess
from betrace.streams.admin import MAX_MESSAGE_BYTES
from betrace.workload.generator import SERVER, SpanSpec, TraceSpec
from betrace.workload.otlp import batch_messages
from betrace.workload.producer import produce
from tests.integration.helpers import read_topic, wait_until_drained, with_rules

RULES = """\
tenant: acme
rules:
  - id: db-under-checkout
    name: No database call below a checkout
    severity: high
    language: traceql
    expression: '{ name = "checkout" } >> { name = "db.query" }'
"""


def _trace(trace_id: bytes, root_name: str) -> tuple[TraceSpec, TraceSpec]:
    """(everything but the root, the root): db.query is a grandchild of the root."""
    now = time.time_ns()
    root, mid = os.urandom(8), os.urandom(8)
    body = [SpanSpec(mid, root, "cart", "svc", SERVER, now, now + 10)]
    body += [SpanSpec(os.urandom(8), mid, "noise", "svc", SERVER, now, now + 10) for _ in range(240)]
    body.insert(5, SpanSpec(os.urandom(8), mid, "db.query", "svc", SERVER, now, now + 10))
    head = [SpanSpec(root, b"", root_name, "svc", SERVER, now, now + 100)]
    return TraceSpec("acme", trace_id, body), TraceSpec("acme", trace_id, head)


async def _max_message_bytes(brokers: str, topic: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=brokers)
    await admin.start()
    try:
        [response] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
        return int({e[0]: e[1] for e in response.resources[0][4]}["max.message.bytes"])
    finally:
        await admin.close()


def test_an_ancestor_that_arrives_windows_later_still_matches(
    pipeline_settings: Settings, tmp_path: Path
) -> None:
    cfg = with_rules(pipeline_settings, tmp_path, RULES, window_spans=20)
    worker = WorkerProcess(cfg, tmp_path / "w.log")
    worker.start()
    try:
        assert worker.wait_for_log("ingestion run", timeout=90), worker.log_tail()
        hit, miss = os.urandom(16), os.urandom(16)
        traces = [_trace(hit, "checkout"), _trace(miss, "browse")]
        # Children first, in 25-span messages, then the roots: the order of a real export.
        asyncio.run(produce(cfg, list(batch_messages([b for b, _ in traces], spans_per_message=25))))
        asyncio.run(produce(cfg, list(batch_messages([h for _, h in traces], spans_per_message=25))))
        wait_until_drained(cfg, worker)
        signals = [orjson.loads(r.value) for r in read_topic(cfg, cfg.topics.signals)]
        changelog = f"{cfg.app_id}-assembly-traces-changelog"
        limit = asyncio.run(_max_message_bytes(cfg.brokers, changelog))
    finally:
        assert worker.stop() == 0, worker.log_tail()
    assert [(s["rule_id"], s["trace_id"]) for s in signals] == [("db-under-checkout", hit.hex())]
    assert "the whole trace (243 span(s) kept)" in signals[0]["message"]
    # Entries with trees can pass the broker's 1 MB default; the state topics allow more.
    assert limit == MAX_MESSAGE_BYTES
