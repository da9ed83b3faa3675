"""Rule evaluation cost per batch as the number of tenants in it grows.

    .venv/bin/python benchmarks/bench_rules_tenants.py [--tenants 1 10 100] [--spans 10000]

Every tenant runs the load harness's 20-rule pack (benchmarks/harness/rules.py).
Side by side, on the same decoded batch: per-tenant evaluation (each tenant's
rules over its own spans) and ``betrace.rules.plan.evaluate_batch`` (each
distinct program once over all its tenants' spans). Both must find exactly
the same violations; the script exits 1 if they differ.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.rules import RULES, tenant_names

from betrace.rules.engine import compile_rule
from betrace.rules.model import Rule
from betrace.rules.plan import Findings, evaluate_batch, evaluate_per_tenant
from betrace.streams.otlp import OtlpDecoder, Record
from betrace.workload.generator import TraceGenerator
from betrace.workload.otlp import batch_messages


def _flat(findings: list[Findings]) -> list[tuple[str, str, str]]:
    return sorted((f.tenant, r.id, v.trace_id) for f in findings for r, v in f.found)


def measure(tenant_count: int, spans: int, repeats: int) -> int:
    tenants = tenant_names(tenant_count)
    gen = TraceGenerator(tenants=tenants, violation_rate=0.2, seed=99)
    decoder = OtlpDecoder(encoding="otlp_proto", tenant_header="X-Scope-OrgID", default_tenant="default")
    records = [
        Record(m.value, m.key, [("X-Scope-OrgID", m.tenant.encode())], timestamp_ms=1)
        for m in batch_messages(gen.traces(spans))
    ]
    table = decoder.decode(records).spans
    compiled = {
        t: [
            compile_rule(Rule(id=r, tenant=t, name=r, expression=e, language=lang, severity=sev))  # type: ignore[arg-type]
            for r, lang, sev, e in RULES
        ]
        for t in tenants
    }

    def run_one(c: Any, t: Any) -> Any:
        return c.evaluate(t)

    ways = {
        "per tenant": lambda: evaluate_per_tenant(table, compiled.__getitem__, run_one),
        "shared programs": lambda: evaluate_batch(table, compiled.__getitem__, run_one),
    }
    answers = {}
    for name, fn in ways.items():
        answers[name] = _flat(fn())  # warm-up, and the answer to compare
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1000)
        print(
            f"{tenant_count:>4} tenants, {table.num_rows:,} spans, {len(RULES)} rules each: "
            f"{name:<16} median {statistics.median(times):7.1f} ms/batch "
            f"({table.num_rows / statistics.median(times) * 1000:,.0f} spans/s), "
            f"{len(answers[name])} violations"
        )
    if answers["per tenant"] != answers["shared programs"]:
        print("MISMATCH: the two ways found different violations")
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tenants", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--spans", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    return max(measure(t, args.spans, args.repeats) for t in args.tenants)


if __name__ == "__main__":
    raise SystemExit(main())
