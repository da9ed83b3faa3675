"""Generate realistic multi-service traces with a known share of violating ones.

Every trace follows one of a few request templates (checkout, profile view,
search). A chosen share of checkout and profile traces omits the span that
the demo rules (``config/rules/``) require, and the generator records exactly
which (tenant, rule, trace) triples must produce a signal.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

#: The rules in config/rules/*.yaml whose violations the generator plants.
PII_RULE = "pii-audit"
PAYMENT_RULE = "payment-fraud-check"

SERVER, CLIENT, INTERNAL = 2, 3, 1


@dataclass(slots=True)
class SpanSpec:
    span_id: bytes
    parent_span_id: bytes
    name: str
    service: str
    kind: int
    start_ns: int
    end_ns: int
    status_code: int = 0
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class TraceSpec:
    tenant: str
    trace_id: bytes
    spans: list[SpanSpec]
    violates: tuple[str, ...] = ()


@dataclass(slots=True)
class GroundTruth:
    """What a correct pipeline must report for a generated workload."""

    spans: int = 0
    traces: int = 0
    expected: set[tuple[str, str, str]] = field(default_factory=set)

    def add(self, trace: TraceSpec) -> None:
        self.spans += len(trace.spans)
        self.traces += 1
        for rule in trace.violates:
            self.expected.add((trace.tenant, rule, trace.trace_id.hex()))


class TraceGenerator:
    """Deterministic for a given seed, so runs and tests are repeatable."""

    def __init__(
        self,
        *,
        tenants: tuple[str, ...] = ("default",),
        violation_rate: float = 0.05,
        seed: int = 7,
        start_ns: int | None = None,
    ) -> None:
        if not 0.0 <= violation_rate <= 1.0:
            msg = f"violation_rate must be within [0, 1], got {violation_rate}"
            raise ValueError(msg)
        if not tenants:
            msg = "at least one tenant is needed"
            raise ValueError(msg)
        self.tenants = tenants
        self.violation_rate = violation_rate
        self.rng = random.Random(seed)  # noqa: S311 - synthetic data, not security
        self.clock_ns = start_ns if start_ns is not None else 1_700_000_000_000_000_000
        self.truth = GroundTruth()

    def _id(self, size: int) -> bytes:
        while True:
            value = self.rng.getrandbits(size * 8).to_bytes(size, "big")
            if any(value):
                return value

    def traces(self, target_spans: int) -> Iterator[TraceSpec]:
        """Yield traces until at least ``target_spans`` spans were generated."""
        emitted = 0
        templates = (self._checkout, self._profile, self._search)
        while emitted < target_spans:
            tenant = self.rng.choice(self.tenants)
            trace = self.rng.choice(templates)(tenant)
            self.truth.add(trace)
            emitted += len(trace.spans)
            yield trace

    # --- templates -------------------------------------------------------

    def _span(  # noqa: PLR0917 - templates read best with positional span fields
        self,
        spans: list[SpanSpec],
        parent: SpanSpec | None,
        name: str,
        service: str,
        kind: int,
        offset_ns: int,
        duration_ns: int,
        **attrs: Any,
    ) -> SpanSpec:
        base = parent.start_ns if parent else self.clock_ns
        span = SpanSpec(
            span_id=self._id(8),
            parent_span_id=parent.span_id if parent else b"",
            name=name,
            service=service,
            kind=kind,
            start_ns=base + offset_ns,
            end_ns=base + offset_ns + duration_ns,
            attributes=attrs,
        )
        spans.append(span)
        return span

    def _root(self, spans: list[SpanSpec], route: str, duration_ms: int) -> SpanSpec:
        self.clock_ns += self.rng.randint(1, 5) * 1_000_000
        return self._span(
            spans,
            None,
            "http.request",
            "frontend",
            SERVER,
            0,
            duration_ms * 1_000_000,
            **{
                "http.method": "POST" if route == "/checkout" else "GET",
                "http.route": route,
                "http.status_code": 200,
            },
        )

    def _db_queries(self, spans: list[SpanSpec], parent: SpanSpec, service: str, n: int) -> None:
        for i in range(n):
            self._span(
                spans,
                parent,
                "db.query",
                service,
                CLIENT,
                (i + 1) * 1_000_000,
                800_000,
                **{"db.system": "postgresql", "db.operation": self.rng.choice(("SELECT", "UPDATE"))},
            )

    def _checkout(self, tenant: str) -> TraceSpec:
        spans: list[SpanSpec] = []
        root = self._root(spans, "/checkout", 120)
        self._span(spans, root, "auth.verify", "auth", SERVER, 1_000_000, 4_000_000, **{"user.id": "u-1"})
        orders = self._span(spans, root, "order.create", "orders", SERVER, 6_000_000, 40_000_000)
        self._db_queries(spans, orders, "orders", self.rng.randint(3, 12))
        amount = round(self.rng.uniform(5, 5000), 2)
        charge = self._span(
            spans,
            root,
            "payment.charge_card",
            "payments",
            CLIENT,
            50_000_000,
            30_000_000,
            amount=amount,
            currency="EUR",
        )
        violates: tuple[str, ...] = ()
        if self.rng.random() < self.violation_rate:
            violates = (PAYMENT_RULE,)
        else:
            self._span(
                spans,
                charge,
                "payment.fraud_check",
                "fraud",
                SERVER,
                2_000_000,
                9_000_000,
                score=round(self.rng.random(), 3),
            )
        self._span(spans, root, "notification.send", "notifications", INTERNAL, 90_000_000, 5_000_000)
        return TraceSpec(tenant, self._id(16), spans, violates)

    def _profile(self, tenant: str) -> TraceSpec:
        spans: list[SpanSpec] = []
        root = self._root(spans, "/profile", 40)
        self._span(spans, root, "auth.verify", "auth", SERVER, 1_000_000, 3_000_000, **{"user.id": "u-2"})
        users = self._span(spans, root, "user.get", "users", SERVER, 5_000_000, 20_000_000)
        self._db_queries(spans, users, "users", self.rng.randint(2, 6))
        pii = self._span(
            spans,
            users,
            "pii.access",
            "users",
            INTERNAL,
            12_000_000,
            2_000_000,
            **{"data.class": "email", "subject.id": f"s-{self.rng.randint(1, 10_000)}"},
        )
        violates: tuple[str, ...] = ()
        if self.rng.random() < self.violation_rate:
            violates = (PII_RULE,)
        else:
            self._span(
                spans, pii, "audit.log", "audit", CLIENT, 2_500_000, 1_000_000, **{"audit.action": "read"}
            )
        return TraceSpec(tenant, self._id(16), spans, violates)

    def _search(self, tenant: str) -> TraceSpec:
        spans: list[SpanSpec] = []
        root = self._root(spans, "/search", 25)
        cache = self._span(
            spans, root, "cache.get", "search", CLIENT, 1_000_000, 500_000, **{"cache.hit": False}
        )
        del cache
        svc = self._span(
            spans,
            root,
            "search.query",
            "search",
            SERVER,
            2_000_000,
            15_000_000,
            **{"search.terms": self.rng.randint(1, 5)},
        )
        self._db_queries(spans, svc, "search", self.rng.randint(1, 4))
        return TraceSpec(tenant, self._id(16), spans, ())
