"""Evaluate stage: run each tenant's rules over a batch of closed traces."""

from __future__ import annotations

import hashlib
import logging
import time
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from betrace.audit.events import (
    AUDIT_PARENT_FIELD,
    AuditEventType,
    AuditRecorder,
    EventRef,
    NullAuditRecorder,
)
from betrace.errors import RuleEvaluationError
from betrace.metrics import StageHooks
from betrace.resilience.quarantine import RuleQuarantine
from betrace.rules.loader import RuleSource
from betrace.rules.model import Rule
from betrace.rules.plan import evaluate_batch
from betrace.streams.schemas import SIGNAL_SCHEMA_VERSION

logger = logging.getLogger(__name__)

STEP_ID = "evaluate"


def signal_id(tenant: str, rule: Rule, trace_id: str) -> str:
    """Deterministic id: a replay of the same trace yields the same signal id."""
    key = f"{tenant}\x1f{rule.id}\x1f{rule.version}\x1f{trace_id}".encode()
    return hashlib.sha256(key).hexdigest()[:32]


class EvaluateStage:
    """Turn closed traces into candidate signal documents."""

    step_id = STEP_ID

    def __init__(self, rules: RuleSource, hooks: StageHooks, *, audit: AuditRecorder | None = None) -> None:
        # A RuleSet (fixed) or a RuleWatcher (hot reload): read once per batch, so one
        # batch always sees one complete rule set even while a new one is swapped in.
        self.rules = rules
        self.hooks = hooks
        self.audit: AuditRecorder = audit or NullAuditRecorder()
        #: The worker session's ``worker.started`` event: parent of every evaluation event.
        self.session: EventRef | None = None
        self.actor = "betrace-worker"
        #: Set by the worker wiring: rules whose evaluation keeps failing are skipped.
        self.quarantine: RuleQuarantine | None = None

    def evaluate(self, traces: pa.Table) -> list[dict[str, Any]]:
        signals: list[dict[str, Any]] = []
        if traces.num_rows == 0:
            return signals
        started = time.perf_counter()
        self.hooks.count("betrace_spans_in_total", traces.num_rows, stage=STEP_ID)
        ruleset = self.rules.current()
        for findings in evaluate_batch(
            traces, lambda t: self._allowed(ruleset.for_tenant(t)), self._run, self.quarantine
        ):
            tenant, found = findings.tenant, findings.found
            # Only violating traces need their source timestamp: most batches have none.
            produced = self._produced_ms(traces, tenant, {v.trace_id for _, v in found})
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
        self.annotate(signals, source="evaluate", spans=traces.num_rows)
        self.hooks.observe("betrace_evaluate_seconds", time.perf_counter() - started, stage=STEP_ID)
        return signals

    def annotate(self, docs: list[dict[str, Any]], *, source: str, spans: int = 0) -> None:
        """Record one ``evaluation.batch`` audit event per tenant of ``docs`` (candidate signals
        of one batch) and put its reference in each doc, for the signal sink's ``signal.emitted``.

        Batch-level on purpose: nothing here is per span, and a batch without candidates
        records nothing.
        """
        if isinstance(self.audit, NullAuditRecorder):
            return  # no trail: candidate documents stay exactly as documented
        by_tenant: dict[str, list[dict[str, Any]]] = {}
        for doc in docs:
            if AUDIT_PARENT_FIELD not in doc:
                by_tenant.setdefault(doc["tenant"], []).append(doc)
        for tenant, mine in by_tenant.items():
            rules = sorted({f"{d['rule_id']}@v{d['rule_version']}" for d in mine})
            ref = self.audit.record(
                AuditEventType.EVALUATION_BATCH,
                actor=self.actor,
                subject=f"{source}:{len(mine)} candidate signal(s)",
                tenant=tenant,
                payload={
                    "source": source,
                    "batch_spans": spans,
                    "candidates": len(mine),
                    "traces": len({d["trace_id"] for d in mine}),
                    "rules": rules[:50],
                },
                parent=self.session,
            )
            parent = ref.to_dict()
            for doc in mine:
                doc[AUDIT_PARENT_FIELD] = parent

    def _allowed(self, compiled: list[Any]) -> list[Any]:
        return compiled if self.quarantine is None else self.quarantine.allowed(compiled)

    def _run(self, compiled: Any, table: pa.Table) -> list[Any]:
        """One rule over one tenant's traces; a failure counts toward the rule's quarantine.

        Until the rule is quarantined its failure fails the batch (retriable), so a
        transient error loses no verdict; once quarantined the rule is skipped.
        """
        if self.quarantine is None:
            return list(compiled.evaluate(table))
        try:
            found = list(compiled.evaluate(table))
        except Exception as exc:
            if self.quarantine.failure(compiled.rule, exc):
                return []
            rule = compiled.rule
            msg = f"rule {rule.tenant}/{rule.id} v{rule.version} failed: {type(exc).__name__}: {exc}"
            raise RuleEvaluationError(msg) from exc
        self.quarantine.success(compiled.rule)
        return found

    @staticmethod
    def _produced_ms(table: pa.Table, tenant: str, trace_ids: set[str]) -> dict[str, int]:
        """Latest source timestamp of each of ``trace_ids``: the start of produce-to-signal latency."""
        wanted = pc.is_in(table.column("trace_id"), value_set=pa.array(list(trace_ids), pa.string()))
        rows = table.filter(pc.and_(wanted, pc.equal(table.column("tenant"), tenant)))
        agg = rows.group_by("trace_id").aggregate([("produced_ms", "max")])
        return dict(
            zip(
                agg.column("trace_id").to_pylist(),
                pc.cast(agg.column("produced_ms_max"), pa.int64()).to_pylist(),
                strict=True,
            )
        )
