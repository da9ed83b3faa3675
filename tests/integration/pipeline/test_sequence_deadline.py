"""``followed_by`` through the real pipeline: the verdict waits for the deadline, not the idle close.

Spans carry wall-clock times, so the rule's deadline (A's end + 4 s) lies ahead
of the worker's clock when the trace goes idle (after 1 s).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
from pathlib import Path

import orjson

from betrace.config import Settings
from betrace.dev.worker import WorkerProcess
from betrace.workload.generator import SERVER, SpanSpec, TraceSpec
from betrace.workload.otlp import batch_messages
from betrace.workload.producer import produce
from tests.integration.helpers import read_topic, wait_until_drained, with_rules

RULES = """\
tenant: acme
rules:
  - id: pii-audit-4s
    name: Every PII access is audited within 4 s
    severity: high
    language: sequence
    expression: pii.access followed_by audit.log within 4s
"""


def _span(name: str, at_ns: int) -> SpanSpec:
    return SpanSpec(os.urandom(8), b"", name, "svc", SERVER, at_ns, at_ns + 1_000_000)


def _send(cfg: Settings, trace: TraceSpec) -> None:
    asyncio.run(produce(cfg, list(batch_messages([trace], spans_per_message=100))))


def test_an_audit_log_after_the_idle_timeout_but_within_the_bound_is_no_violation(
    pipeline_settings: Settings, tmp_path: Path
) -> None:
    cfg = with_rules(pipeline_settings, tmp_path, RULES)
    worker = WorkerProcess(cfg, tmp_path / "w.log")
    worker.start()
    try:
        assert worker.wait_for_log("ingestion run", timeout=90), worker.log_tail()
        late, never = os.urandom(16), os.urandom(16)
        now = time.time_ns()
        _send(cfg, TraceSpec("acme", late, [_span("pii.access", now)]))
        _send(cfg, TraceSpec("acme", never, [_span("pii.access", now)]))
        time.sleep(2.5)  # both traces idle for longer than the 1 s idle timeout
        _send(cfg, TraceSpec("acme", late, [_span("audit.log", now + 2_500_000_000)]))
        time.sleep(max(0.0, (now + 4_001_000_000 - time.time_ns()) / 1e9) + 1.5)
        wait_until_drained(cfg, worker)
        signals = [orjson.loads(r.value) for r in read_topic(cfg, cfg.topics.signals)]
    finally:
        assert worker.stop() == 0, worker.log_tail()
    assert [(s["rule_id"], s["trace_id"]) for s in signals] == [("pii-audit-4s", never.hex())]
    # Decided at the deadline (A's end + 4 s), not at the idle close 1 s after it.
    detected = dt.datetime.fromisoformat(signals[0]["detected_at"]).timestamp()
    assert detected >= (now + 4_000_000_000) / 1e9
