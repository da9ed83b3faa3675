"""Every metric BeTrace reports, declared in one place, and the stage hook interface.

Stages never touch counters directly: they call a :class:`StageHooks` (faust's
sensor idea), so exporting to Prometheus (issue 8) or printing a demo summary
is a matter of which hooks are installed.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str
    kind: str
    unit: str
    help: str
    labels: tuple[str, ...]


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("betrace_records_in_total", "counter", "records", "Kafka records consumed", ("stage",)),
    MetricSpec("betrace_spans_in_total", "counter", "spans", "spans consumed by a stage", ("stage",)),
    MetricSpec("betrace_spans_out_total", "counter", "spans", "spans emitted by a stage", ("stage",)),
    MetricSpec("betrace_duplicates_total", "counter", "spans", "exact duplicate spans dropped", ("stage",)),
    MetricSpec(
        "betrace_dead_letters_total", "counter", "records", "records sent to the DLQ", ("stage", "reason")
    ),
    MetricSpec("betrace_traces_closed_total", "counter", "traces", "traces closed", ("stage", "cause")),
    MetricSpec(
        "betrace_traces_held_total",
        "counter",
        "traces",
        "idle traces kept open until a followed_by deadline passes",
        ("stage",),
    ),
    MetricSpec("betrace_live_traces", "gauge", "traces", "traces being assembled", ("stage",)),
    MetricSpec(
        "betrace_signals_total", "counter", "signals", "signals emitted", ("stage", "rule", "severity")
    ),
    MetricSpec("betrace_sink_rows_total", "counter", "rows", "rows written by a sink", ("sink",)),
    MetricSpec("betrace_sink_flush_seconds", "histogram", "seconds", "sink flush latency", ("sink",)),
    MetricSpec("betrace_batch_size", "histogram", "records", "records per stage batch", ("stage",)),
    MetricSpec("betrace_evaluate_seconds", "histogram", "seconds", "rule evaluation per batch", ("stage",)),
    MetricSpec(
        "betrace_signals_emitted_total", "counter", "signals", "signals published", ("rule", "severity")
    ),
    MetricSpec(
        "betrace_produce_to_signal_seconds",
        "histogram",
        "seconds",
        "from the trace's last input record to its signal",
        ("tenant",),
    ),
    MetricSpec("betrace_windows", "gauge", "windows", "trace windows held", ("stage",)),
    MetricSpec("betrace_bytes_held", "gauge", "bytes", "span bytes held by assembly", ("stage",)),
    MetricSpec("betrace_late_spans_total", "counter", "spans", "spans after their trace closed", ("stage",)),
    MetricSpec(
        "betrace_late_span_age_seconds",
        "histogram",
        "seconds",
        "late span after its trace's close",
        ("stage",),
    ),
    MetricSpec(
        "betrace_late_verdict_changes_total",
        "counter",
        "signals",
        "late spans turned pass to violation",
        ("stage",),
    ),
    MetricSpec(
        "betrace_windows_evaluated_total", "counter", "windows", "trace windows evaluated", ("stage",)
    ),
    MetricSpec("betrace_checkpoints_total", "counter", "writes", "open-trace state saved", ("stage",)),
    MetricSpec(
        "betrace_assembly_limit_total",
        "counter",
        "traces",
        "traces closed early by a limit",
        ("stage", "reason"),
    ),
    MetricSpec(
        "betrace_spans_dropped_total", "counter", "spans", "spans dropped by a limit", ("stage", "reason")
    ),
    MetricSpec(
        "betrace_replayed_spans_skipped_total",
        "counter",
        "spans",
        "replayed spans already in state",
        ("stage",),
    ),
    MetricSpec(
        "betrace_decisions_evicted_total",
        "counter",
        "traces",
        "verdicts forgotten before their time",
        ("stage",),
    ),
    MetricSpec("betrace_breaker_state", "gauge", "state", "0 closed, 1 half-open, 2 open", ("breaker",)),
    MetricSpec("betrace_cache_hits_total", "counter", "lookups", "cache hits", ("cache",)),
    MetricSpec("betrace_cache_misses_total", "counter", "lookups", "cache misses", ("cache",)),
    MetricSpec("betrace_spool_depth", "gauge", "items", "writes waiting in the local spool", ("spool",)),
    MetricSpec(
        "betrace_consumer_lag",
        "gauge",
        "records",
        "end offset minus committed offset",
        ("group", "topic", "partition"),
    ),
    MetricSpec(
        "betrace_consumer_committed_offset",
        "gauge",
        "offset",
        "committed offset",
        ("group", "topic", "partition"),
    ),
    MetricSpec(
        "betrace_consumer_end_offset", "gauge", "offset", "log end offset", ("group", "topic", "partition")
    ),
    MetricSpec("betrace_consumer_group_lagging", "gauge", "bool", "1 when total lag > threshold", ("group",)),
    # issue 7: resilience (breakers, spool, backpressure, quarantine)
    MetricSpec(
        "betrace_breaker_transitions_total",
        "counter",
        "transitions",
        "circuit breaker state changes",
        ("breaker", "to"),
    ),
    MetricSpec("betrace_spool_bytes", "gauge", "bytes", "bytes held in the local spool", ("spool",)),
    MetricSpec("betrace_spooled_total", "counter", "items", "writes diverted to the spool", ("spool",)),
    MetricSpec("betrace_spool_replayed_total", "counter", "items", "spooled writes replayed", ("spool",)),
    MetricSpec(
        "betrace_spool_corrupt_total",
        "counter",
        "records",
        "torn or corrupt spool records skipped",
        ("spool",),
    ),
    MetricSpec(
        "betrace_paused_partitions", "gauge", "partitions", "partitions paused by backpressure", ("stage",)
    ),
    MetricSpec("betrace_rules_quarantined", "gauge", "rules", "rules in quarantine", ("tenant",)),
    MetricSpec("betrace_rule_quarantines_total", "counter", "rules", "rules quarantined", ("tenant", "rule")),
    # issue 7: the OTLP/HTTP receiver
    MetricSpec(
        "betrace_receiver_requests_total", "counter", "requests", "POST /v1/traces by status", ("code",)
    ),
    MetricSpec(
        "betrace_receiver_spans_total",
        "counter",
        "spans",
        "spans accepted or rejected by the receiver",
        ("outcome",),
    ),
    MetricSpec(
        "betrace_receiver_queue_fill", "gauge", "ratio", "receiver records in flight / queue size", ()
    ),
    # issue 7: the Redis cache tier (betrace_cache_hits_total / _misses_total above)
    MetricSpec(
        "betrace_cache_remote_hits_total",
        "counter",
        "lookups",
        "cache hits answered by Redis (not by the in-process LRU)",
        ("cache",),
    ),
    MetricSpec(
        "betrace_cache_fallback_hits_total",
        "counter",
        "lookups",
        "cache hits answered by the in-process LRU while Redis was unavailable",
        ("cache",),
    ),
    MetricSpec(
        "betrace_cache_errors_total",
        "counter",
        "calls",
        "Redis cache calls that failed or were refused by the open breaker",
        ("cache", "reason"),
    ),
    MetricSpec("betrace_cache_seconds", "histogram", "seconds", "Redis cache call latency", ("cache", "op")),
    # issue 9: integrity checks
    MetricSpec(
        "betrace_anomalies_total",
        "counter",
        "anomalies",
        "integrity anomalies opened (new or re-opened)",
        ("kind", "source"),
    ),
    MetricSpec(
        "betrace_anomalies_resolved_total", "counter", "anomalies", "anomalies a recheck resolved", ("kind",)
    ),
    MetricSpec(
        "betrace_integrity_skipped_total",
        "counter",
        "spans",
        "closed-trace spans left unchecked because the check buffer was full",
        ("stage",),
    ),
    MetricSpec(
        "betrace_integrity_check_seconds", "histogram", "seconds", "one integrity check pass", ("source",)
    ),
    MetricSpec(
        "betrace_archive_units_total",
        "counter",
        "units",
        "archival units (tenant, day, kind, part) finished, by outcome",
        ("tenant", "outcome"),
    ),
    MetricSpec(
        "betrace_archive_rows_total", "counter", "rows", "rows moved to cold storage", ("tenant", "kind")
    ),
    MetricSpec("betrace_archive_phase_seconds", "histogram", "seconds", "one archival phase", ("phase",)),
    MetricSpec("betrace_storage_bytes", "gauge", "bytes", "stored bytes per tier", ("tenant", "tier")),
    MetricSpec("betrace_storage_rows", "gauge", "rows", "stored rows per tier", ("tenant", "tier", "kind")),
    MetricSpec(
        "betrace_storage_day_seconds",
        "gauge",
        "seconds",
        "start of the oldest/newest stored day per tier (epoch seconds)",
        ("tenant", "tier", "edge"),
    ),
    # issue 9: the audit trail
    MetricSpec("betrace_audit_events_total", "counter", "events", "audit events written by type", ("type",)),
    MetricSpec(
        "betrace_audit_dropped_total",
        "counter",
        "events",
        "audit events dropped or parent links cut",
        ("reason",),
    ),
    MetricSpec("betrace_audit_buffered", "gauge", "events", "audit events waiting to be written", ()),
    MetricSpec("betrace_audit_flush_seconds", "histogram", "seconds", "one audit batch write", ()),
)

METRICS_BY_NAME: dict[str, MetricSpec] = {m.name: m for m in METRICS}


class StageHooks(Protocol):
    """What a stage reports. Implementations must be cheap and never raise."""

    def count(self, name: str, value: float = 1, **labels: str) -> None: ...

    def gauge(self, name: str, value: float, **labels: str) -> None: ...

    def observe(self, name: str, value: float, **labels: str) -> None: ...


@dataclass
class InMemoryHooks:
    """Thread-safe totals, used by ``betrace demo`` and by tests."""

    counters: Counter[tuple[str, tuple[tuple[str, str], ...]]] = field(default_factory=Counter)
    gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = field(default_factory=dict)
    observations: dict[tuple[str, tuple[tuple[str, str], ...]], list[float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, name: str, value: float = 1, **labels: str) -> None:
        with self._lock:
            self.counters[(name, tuple(sorted(labels.items())))] += int(value)

    def gauge(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self.gauges[(name, tuple(sorted(labels.items())))] = value

    def observe(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self.observations.setdefault((name, tuple(sorted(labels.items()))), []).append(value)
            # Keep memory bounded: a recent window is enough for a summary.
            obs = self.observations[(name, tuple(sorted(labels.items())))]
            if len(obs) > 10_000:
                del obs[:5_000]

    def total(self, name: str, **labels: str) -> int:
        """Sum of a counter over every label set that contains ``labels``."""
        want = set(labels.items())
        with self._lock:
            return sum(v for (n, lbl), v in self.counters.items() if n == name and want <= set(lbl))
