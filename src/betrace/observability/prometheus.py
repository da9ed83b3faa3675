"""Export the metrics declared in :mod:`betrace.metrics` with prometheus-client.

:class:`PrometheusHooks` is a :class:`~betrace.metrics.StageHooks`: stages keep
calling ``count``/``gauge``/``observe`` and never see Prometheus. Label
cardinality stays bounded: labels are the declared ones only (no trace ids can
slip in), and at most ``max_tenants`` distinct tenant values are exported;
later tenants share the value ``_other``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from betrace.metrics import METRICS, MetricSpec

logger = logging.getLogger(__name__)

# aiohttp rejects a charset parameter in content_type; the exposition format is UTF-8 anyway.
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4"

__all__ = ["PROMETHEUS_CONTENT_TYPE", "PrometheusHooks"]

OTHER_TENANT = "_other"

_BUCKETS = {
    "seconds": (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    "records": (1, 5, 10, 50, 100, 250, 500, 1000, 5000, 20000),
}


class PrometheusHooks:
    """StageHooks backed by a private registry (no global state, safe in tests)."""

    def __init__(self, *, max_tenants: int = 100, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.max_tenants = max_tenants
        self._tenants: set[str] = set()
        self._lock = threading.Lock()
        self._unknown: set[str] = set()
        self._metrics: dict[str, tuple[MetricSpec, Any]] = {}
        for spec in METRICS:
            self._metrics[spec.name] = (spec, self._make(spec))
        # process_resident_memory_bytes, process_cpu_seconds_total, … under our prefix.
        ProcessCollector(namespace="betrace", registry=self.registry)

    def _make(self, spec: MetricSpec) -> Any:
        name = spec.name
        doc = f"{spec.help} ({spec.unit})"
        if spec.kind == "counter":
            # prometheus-client appends _total itself.
            return Counter(name.removesuffix("_total"), doc, spec.labels, registry=self.registry)
        if spec.kind == "gauge":
            return Gauge(name, doc, spec.labels, registry=self.registry)
        buckets = _BUCKETS.get(spec.unit, Histogram.DEFAULT_BUCKETS)
        return Histogram(name, doc, spec.labels, registry=self.registry, buckets=buckets)

    def _child(self, name: str, labels: dict[str, str]) -> Any:
        entry = self._metrics.get(name)
        if entry is None:
            if name not in self._unknown:
                self._unknown.add(name)
                logger.warning("metric %s is not declared in betrace.metrics.METRICS; not exported", name)
            return None
        spec, metric = entry
        if not spec.labels:
            return metric
        values = []
        for label in spec.labels:
            value = str(labels.get(label, ""))
            if label == "tenant":
                value = self._tenant(value)
            values.append(value)
        return metric.labels(*values)

    def _tenant(self, tenant: str) -> str:
        with self._lock:
            if tenant in self._tenants:
                return tenant
            if len(self._tenants) < self.max_tenants:
                self._tenants.add(tenant)
                return tenant
        return OTHER_TENANT

    def count(self, name: str, value: float = 1, **labels: str) -> None:
        child = self._child(name, labels)
        if child is not None:
            child.inc(value)

    def gauge(self, name: str, value: float, **labels: str) -> None:
        child = self._child(name, labels)
        if child is not None:
            child.set(value)

    def observe(self, name: str, value: float, **labels: str) -> None:
        child = self._child(name, labels)
        if child is not None:
            child.observe(value)

    def exposition(self) -> bytes:
        """The text format that Prometheus scrapes."""
        data: bytes = generate_latest(self.registry)
        return data

    def snapshot(self) -> dict[str, Any]:
        """Every sample as JSON-friendly data, for ``GET /v1/stats``."""
        out: dict[str, Any] = {}
        for family in self.registry.collect():
            samples = [
                {"name": s.name, "labels": dict(s.labels), "value": s.value}
                for s in family.samples
                if not s.name.endswith("_created")
            ]
            if samples:
                out[family.name] = {"type": family.type, "help": family.documentation, "samples": samples}
        return out
