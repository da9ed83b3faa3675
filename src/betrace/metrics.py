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
    MetricSpec("betrace_live_traces", "gauge", "traces", "traces being assembled", ("stage",)),
    MetricSpec(
        "betrace_signals_total", "counter", "signals", "signals emitted", ("stage", "rule", "severity")
    ),
    MetricSpec("betrace_sink_rows_total", "counter", "rows", "rows written by a sink", ("sink",)),
    MetricSpec("betrace_sink_flush_seconds", "histogram", "seconds", "sink flush latency", ("sink",)),
)


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
