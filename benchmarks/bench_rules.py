"""Rule-engine throughput: 20 mixed rules over batches of ~50k spans, one core.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/bench_rules.py [--batches N]``.
Prints spans per second across all 20 rules and the p50/p99 time to evaluate
one batch with all of them (each batch is a new table, so the per-batch work
-- trace encoding, attribute extraction, parent links -- is counted every
time, as in the evaluate stage).
"""

from __future__ import annotations

import argparse
import random
import time

import orjson
import pyarrow as pa

from betrace.agents.gc_policy import tune_gc
from betrace.rules.engine import compile_rule
from betrace.rules.model import Rule
from betrace.streams.schemas import SPAN_SCHEMA

RULES: list[tuple[str, str]] = [
    ("betrace", "when { pii.access } always { audit.log }"),
    ("betrace", "when { payment.charge_card.where(amount > 1000) } always { payment.fraud_check }"),
    ("betrace", "when { count(http.request) != count(http.response) } never { orphaned_request }"),
    (
        "betrace",
        'when { api.request.where(endpoint matches "/api/v1/admin/.*") } '
        "always { auth.check_admin } never { auth.bypass }",
    ),
    ("betrace", "when { db.query.where(db.system == postgresql and rows > 500) } always { cache.lookup }"),
    ("betrace", "when { {span.http.status_code >= 500} } always { error.logged }"),
    (
        "betrace",
        "when { payment.charge_card.where(currency in [USD, EUR]) and not payment.refund } "
        "always { payment.receipt }",
    ),
    ("betrace", "when { count(http.retry) > 3 } always { circuit_breaker.open }"),
    ("traceql", '{ span.http.status_code >= 500 && resource.service.name = "frontend" }'),
    ("traceql", '{ status = error } >> { span.db.system = "postgresql" }'),
    ("traceql", "{ span.http.status_code >= 200 && span.http.status_code < 300 } | count() > 15"),
    ("traceql", '{ resource.service.name = "checkout" } > { status = error }'),
    ("traceql", '{ span.http.method =~ "DELETE|PATCH" && duration > 50ms }'),
    ("traceql", "{ trace:duration > 2s }"),
    ("traceql", "{ } | avg(duration) > 40ms"),
    ("traceql", "{ kind = server } ~ { kind = client && status = error }"),
    ("traceql", '{ span.user.id = "u7" } && { name = "pii.access" }'),
    ("sequence", "pii.access followed_by audit.log within 30s"),
    ("sequence", "payment.charge_card.where(amount > 1000) followed_by payment.receipt within 5s from start"),
    ("sequence", '{ status = error } followed_by { name = "error.logged" } within 1s'),
]
BENIGN = ["http.request", "http.response", "db.query", "render", "cache.lookup", "queue.publish"]
#: Sensitive flows: the compliant span sequence, and the span a violation drops.
FLOWS = [
    (["pii.access", "audit.log"], "audit.log"),
    (["payment.charge_card", "payment.fraud_check", "payment.receipt"], "payment.fraud_check"),
    (["api.request", "auth.check_admin"], "auth.check_admin"),
]
SERVICES = ["frontend", "checkout", "cart", "catalog", "payments"]


def make_batch(rng: random.Random, spans: int, per_trace: int = 20, bad: float = 0.01) -> pa.Table:
    """Traces of benign spans plus one sensitive flow each; ``bad`` of them misbehave."""
    rows: dict[str, list[object]] = {name: [] for name in SPAN_SCHEMA.names}
    resources = [
        orjson.dumps({"service.name": s, "host.name": f"h{i}"}).decode() for i, s in enumerate(SERVICES)
    ]
    base = 1_700_000_000_000_000_000
    for trace in range(spans // per_trace):
        flow, dropped = rng.choice(FLOWS)
        misbehave = rng.random() < bad
        names = [n for n in flow if not (misbehave and n == dropped)]
        names += [rng.choice(BENIGN) for _ in range(per_trace - len(names))]
        for index, name in enumerate(names):
            i = trace * per_trace + index
            error = rng.random() < bad / 2
            attrs: dict[str, object] = {
                "http.method": rng.choice(["GET", "POST", "GET", "PUT"]),
                "http.status_code": 503 if error else rng.choice([200, 200, 201, 404]),
                "user.id": f"u{rng.randrange(1000)}",
            }
            if name == "payment.charge_card":
                attrs |= {"amount": rng.uniform(1, 3000), "currency": rng.choice(["USD", "EUR"])}
            elif name == "db.query":
                attrs |= {"db.system": rng.choice(["postgresql", "mysql"]), "rows": rng.randrange(600)}
            elif name == "api.request":
                attrs["endpoint"] = rng.choice(["/api/v1/admin/users", "/api/v1/items"])
            service = rng.randrange(len(SERVICES))
            start = base + trace * 10**10 + index * 5 * 10**6
            rows["tenant"].append("bench")
            rows["trace_id"].append(f"{trace:032x}")
            rows["span_id"].append(f"{i:016x}")
            parent = None if index == 0 else f"{i - rng.randint(1, index):016x}"
            rows["parent_span_id"].append(parent)
            rows["name"].append(name)
            rows["service"].append(SERVICES[service])
            rows["kind"].append(rng.randrange(6))
            rows["status_code"].append(2 if error else rng.choice([0, 1]))
            rows["start_ns"].append(start)
            rows["end_ns"].append(start + rng.randrange(1, 40) * 10**6)
            rows["attributes"].append(orjson.dumps(attrs).decode())
            rows["resource_attributes"].append(resources[service])
            rows["produced_ms"].append(0)
    return pa.table(rows, schema=SPAN_SCHEMA)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spans", type=int, default=50_000)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--bad", type=float, default=0.01, help="share of misbehaving traces")
    parser.add_argument("--top", type=int, default=6, help="slowest rules to list")
    parser.add_argument(
        "--default-gc", action="store_true", help="keep CPython's GC thresholds (the worker tunes them)"
    )
    args = parser.parse_args()
    if not args.default_gc:
        tune_gc()
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    rng = random.Random(7)
    compiled = [
        compile_rule(Rule(id=f"r{i}", tenant="bench", name=f"r{i}", expression=e, language=lang))  # type: ignore[arg-type]
        for i, (lang, e) in enumerate(RULES)
    ]
    batch = make_batch(rng, args.spans, bad=args.bad)
    for rule in compiled:  # warm-up (imports, DuckDB connection)
        rule.evaluate(batch)
    per_rule = [0.0] * len(compiled)
    per_batch: list[float] = []
    violations = 0
    cpu_start = time.process_time()
    for _ in range(args.batches):
        fresh = pa.Table.from_batches(batch.to_batches())  # new identity: no cached context
        b0 = time.perf_counter()
        for i, rule in enumerate(compiled):
            t0 = time.perf_counter()
            violations += len(rule.evaluate(fresh))
            per_rule[i] += time.perf_counter() - t0
        per_batch.append(time.perf_counter() - b0)
    elapsed = sum(per_batch)
    cpu = time.process_time() - cpu_start
    spans = args.spans * args.batches
    ordered = sorted(per_batch)
    p50 = ordered[len(ordered) // 2]
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    print(f"{len(compiled)} rules, {args.batches} batches x {args.spans} spans")
    print(f"{spans / elapsed:,.0f} spans/s through all rules ({elapsed / args.batches * 1000:.1f} ms/batch)")
    # CPU time excludes waiting for a core: steadier than wall time on a shared machine.
    print(f"{spans / cpu:,.0f} spans per CPU-second ({cpu / args.batches * 1000:.1f} ms CPU/batch)")
    worst = ordered[-1]
    print(f"batch evaluation: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {worst * 1000:.1f} ms")
    print(f"violations: {violations / args.batches:.0f} per batch")
    top = sorted(zip(RULES, per_rule, strict=True), key=lambda x: -x[1])
    for (lang, expression), seconds in top[: args.top]:
        print(f"  {seconds / args.batches * 1000:6.2f} ms/batch  [{lang}] {expression[:70]}")


if __name__ == "__main__":
    main()
