"""Evaluate stage: run each tenant's rules over a batch of closed traces."""

from __future__ import annotations

import hashlib
import logging
import time
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from betrace.metrics import StageHooks
from betrace.rules.loader import RuleSource
from betrace.rules.model import Rule
from betrace.streams.schemas import SIGNAL_SCHEMA_VERSION
from betrace.streams.topics import split_by_tenant

logger = logging.getLogger(__name__)

STEP_ID = "evaluate"


def signal_id(tenant: str, rule: Rule, trace_id: str) -> str:
    """Deterministic id: a replay of the same trace yields the same signal id."""
    key = f"{tenant}\x1f{rule.id}\x1f{rule.version}\x1f{trace_id}".encode()
    return hashlib.sha256(key).hexdigest()[:32]


class EvaluateStage:
    """Turn closed traces into candidate signal documents."""

    step_id = STEP_ID

    def __init__(self, rules: RuleSource, hooks: StageHooks) -> None:
        # A RuleSet (fixed) or a RuleWatcher (hot reload): read once per batch, so one
        # batch always sees one complete rule set even while a new one is swapped in.
        self.rules = rules
        self.hooks = hooks

    def evaluate(self, traces: pa.Table) -> list[dict[str, Any]]:
        signals: list[dict[str, Any]] = []
        if traces.num_rows == 0:
            return signals
        started = time.perf_counter()
        self.hooks.count("betrace_spans_in_total", traces.num_rows, stage=STEP_ID)
        ruleset = self.rules.current()
        for tenant, table in split_by_tenant(traces):
            compiled = ruleset.for_tenant(tenant)
            if not compiled:
                continue
            found = [(ev.rule, v) for ev in compiled for v in ev.evaluate(table)]
            if not found:
                continue
            # Only violating traces need their source timestamp: most batches have none.
            produced = self._produced_ms(table, {v.trace_id for _, v in found})
            detected_at = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
            for rule, violation in found:
                signals.append(
                    {
                        "schema_version": SIGNAL_SCHEMA_VERSION,
                        "signal_id": signal_id(tenant, rule, violation.trace_id),
                        "tenant": tenant,
                        "rule_id": rule.id,
                        "rule_version": rule.version,
                        "rule_name": rule.name,
                        "trace_id": violation.trace_id,
                        "span_ids": list(violation.span_ids),
                        "severity": rule.severity,
                        "message": violation.message,
                        "detected_at": detected_at,
                        "source_produced_ms": produced.get(violation.trace_id, 0),
                    }
                )
                self.hooks.count("betrace_signals_total", stage=STEP_ID, rule=rule.id, severity=rule.severity)
        self.hooks.observe("betrace_evaluate_seconds", time.perf_counter() - started, stage=STEP_ID)
        return signals

    @staticmethod
    def _produced_ms(table: pa.Table, trace_ids: set[str]) -> dict[str, int]:
        """Latest source timestamp of each of ``trace_ids``: the start of produce-to-signal latency."""
        rows = table.filter(
            pc.is_in(table.column("trace_id"), value_set=pa.array(list(trace_ids), pa.string()))
        )
        agg = rows.group_by("trace_id").aggregate([("produced_ms", "max")])
        return dict(
            zip(
                agg.column("trace_id").to_pylist(),
                pc.cast(agg.column("produced_ms_max"), pa.int64()).to_pylist(),
                strict=True,
            )
        )
