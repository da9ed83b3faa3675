"""Per-tenant rule files for the load harnesses, and a check that they agree with the workload.

Every tenant gets the same 20 rules: the two whose violations
:class:`betrace.workload.generator.TraceGenerator` plants (``pii-audit`` and
``payment-fraud-check``), plus 18 rules in all three languages that look at
the same spans and do real work (their ``when`` holds on most traces, or
their query scans every span) but never fire on this workload. The ground
truth of the generator is therefore exactly the set of expected signals,
which :func:`check_rules_against_workload` proves before any load is sent.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from betrace.rules.engine import compile_rule
from betrace.rules.model import Rule
from betrace.streams.otlp import OtlpDecoder, Record
from betrace.workload.generator import PAYMENT_RULE, PII_RULE, TraceGenerator
from betrace.workload.otlp import batch_messages

#: (id, language, severity, expression). The first two are the ones the generator plants.
RULES: tuple[tuple[str, str, str, str], ...] = (
    (PII_RULE, "betrace", "high", "when { pii.access } always { audit.log }"),
    (PAYMENT_RULE, "betrace", "critical", "when { payment.charge_card } always { payment.fraud_check }"),
    ("charge-has-order", "betrace", "medium", "when { payment.charge_card } always { order.create }"),
    ("pii-via-user-service", "betrace", "medium", "when { pii.access } always { user.get }"),
    (
        "request-authenticated",
        "betrace",
        "high",
        'when { http.request.where(http.route != "/search") } always { auth.verify }',
    ),
    (
        "no-mixed-databases",
        "betrace",
        "low",
        "when { db.query.where(db.system == postgresql) } never { db.query.where(db.system == mysql) }",
    ),
    (
        "server-errors-logged",
        "betrace",
        "high",
        "when { http.request.where(http.status_code >= 500) } always { error.logged }",
    ),
    ("query-fanout", "betrace", "medium", "when { count(db.query) > 20 } always { cache.get }"),
    (
        "usd-receipt",
        "betrace",
        "medium",
        "when { payment.charge_card.where(currency in [USD, GBP]) } always { payment.receipt }",
    ),
    ("audit-no-delete", "betrace", "critical", "when { audit.log } never { pii.delete }"),
    ("http-5xx", "traceql", "high", "{ span.http.status_code >= 500 }"),
    ("error-before-db", "traceql", "medium", '{ status = error } >> { span.db.system = "postgresql" }'),
    ("db-query-storm", "traceql", "low", '{ span.db.system = "postgresql" } | count() > 20'),
    ("payment-child-error", "traceql", "high", '{ resource.service.name = "payments" } > { status = error }'),
    ("destructive-methods", "traceql", "medium", '{ span.http.method =~ "DELETE|PATCH" }'),
    ("slow-trace", "traceql", "low", "{ trace:duration > 2s }"),
    ("huge-charge", "traceql", "critical", "{ span.amount > 100000 }"),
    ("sibling-client-error", "traceql", "medium", "{ kind = server } ~ { kind = client && status = error }"),
    ("auth-then-db", "sequence", "low", "auth.verify followed_by db.query within 5s"),
    ("cache-then-search", "sequence", "low", "cache.get followed_by search.query within 1s"),
)


def tenant_names(count: int) -> tuple[str, ...]:
    return tuple(f"t{i:03d}" for i in range(count))


def rule_doc(tenant: str, rules_per_tenant: int = len(RULES)) -> dict[str, object]:
    if not 2 <= rules_per_tenant <= len(RULES):
        msg = f"rules per tenant must be within 2..{len(RULES)}, got {rules_per_tenant}"
        raise ValueError(msg)
    return {
        "tenant": tenant,
        "rules": [
            {"id": rid, "name": rid.replace("-", " "), "severity": sev, "language": lang, "expression": expr}
            for rid, lang, sev, expr in RULES[:rules_per_tenant]
        ],
    }


def write_rule_files(rules_dir: Path, tenants: tuple[str, ...], rules_per_tenant: int = len(RULES)) -> Path:
    """One YAML file per tenant, in the format of ``config/rules/`` (see rules/loader.py)."""
    rules_dir.mkdir(parents=True, exist_ok=True)
    for tenant in tenants:
        path = rules_dir / f"{tenant}.yaml"
        path.write_text(yaml.safe_dump(rule_doc(tenant, rules_per_tenant), sort_keys=False), encoding="utf-8")
    return rules_dir


def check_rules_against_workload(
    rules_per_tenant: int = len(RULES), *, spans: int = 20_000, violation_rate: float = 0.2
) -> int:
    """Evaluate the rules in process on a generated sample; fail unless violations == ground truth.

    Returns how many violations the sample had (all of them expected).
    """
    gen = TraceGenerator(tenants=("t000",), violation_rate=violation_rate, seed=99)
    decoder = OtlpDecoder(encoding="otlp_proto", tenant_header="X-Scope-OrgID", default_tenant="default")
    records = [
        Record(m.value, m.key, [("X-Scope-OrgID", m.tenant.encode())], timestamp_ms=1)
        for m in batch_messages(gen.traces(spans))
    ]
    table = decoder.decode(records).spans
    found: set[tuple[str, str, str]] = set()
    for rid, lang, sev, expr in RULES[:rules_per_tenant]:
        rule = Rule(id=rid, tenant="t000", name=rid, expression=expr, language=lang, severity=sev)  # type: ignore[arg-type]
        found |= {("t000", rid, v.trace_id) for v in compile_rule(rule).evaluate(table)}
    expected = {k for k in gen.truth.expected if k[1] in {r[0] for r in RULES[:rules_per_tenant]}}
    if found != expected:
        extra = sorted({r for _, r, _ in found - expected})
        missed = sorted({r for _, r, _ in expected - found})
        msg = (
            f"the harness rules disagree with the workload's ground truth: "
            f"{len(found - expected)} unexpected violations (rules {extra}), "
            f"{len(expected - found)} missed (rules {missed})"
        )
        raise SystemExit(msg)
    return len(found)
