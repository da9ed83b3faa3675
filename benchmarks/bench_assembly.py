"""Trace assembly in isolation: throughput, memory of many live traces, one huge trace.

    .venv/bin/python benchmarks/bench_assembly.py [--live 100000] [--huge 1000000] [--steady 0]
        [--sequence 'pii.access followed_by audit.log within 30s' ...]
        [--traceql '{ name = "db.query" } >> { name = "pii.access" }' ...]

Runs the assembler in-process (no Kafka), with the demo rules (plus any
``--sequence`` or ``--traceql`` rule), on synthetic Arrow batches, and prints spans/s and RSS
figures for benchmarks/RESULTS.md,
with the worker's GC policy (``--default-gc``: CPython's).
The live figures include building the batches; ``--steady N`` (an extra
measurement) feeds N pre-built messages as a continuous stream instead.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import pyarrow as pa

from betrace.agents.assembly.assembler import TraceAssembler
from betrace.agents.gc_policy import tune_gc
from betrace.config import load_settings
from betrace.metrics import InMemoryHooks
from betrace.rules.engine import compile_rule
from betrace.rules.loader import load_rules
from betrace.rules.model import CompiledRule, Rule
from betrace.streams.schemas import SPAN_SCHEMA

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["http.request", "auth.verify", "db.query", "pii.access", "audit.log"]
#: Extra rules of tenant "acme" (``--sequence``, ``--traceql``).
EXTRA: list[CompiledRule] = []


def rss_mib() -> float:
    with Path("/proc/self/statm").open() as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def batch(first_trace: int, traces: int, spans_per_trace: int, start: int = 0) -> pa.Table:
    n = traces * spans_per_trace
    ids = [f"{first_trace + i // spans_per_trace:032x}" for i in range(n)]
    return pa.table(
        {
            "tenant": ["acme"] * n,
            "trace_id": ids,
            "span_id": [f"{start + i + 1:016x}" for i in range(n)],
            "parent_span_id": [None] * n,
            "name": [NAMES[i % len(NAMES)] for i in range(n)],
            "service": ["svc"] * n,
            "kind": [1] * n,
            "status_code": [0] * n,
            "start_ns": list(range(start, start + n)),
            "end_ns": list(range(start + 1, start + n + 1)),
            "attributes": ['{"k":1}'] * n,
            "resource_attributes": ['{"service.name":"svc"}'] * n,
            "produced_ms": [0] * n,
        },
        schema=SPAN_SCHEMA,
    )


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def assembler(clock: Clock, *, live_limit: int, decision_cache_s: float = 300.0) -> TraceAssembler:
    settings = load_settings(
        rules_dir=ROOT / "config" / "rules",
        max_live_traces=live_limit,
        max_live_traces_per_tenant=live_limit,
        max_trace_bytes=2**40,  # the huge trace is judged in windows, not capped
        decision_cache_s=decision_cache_s,
    )
    rules = load_rules(settings.rules_dir)
    acme = [*rules.for_tenant("acme"), *EXTRA]
    return TraceAssembler(
        idle_timeout_s=settings.idle_timeout_s,
        max_trace_age_s=settings.max_trace_age_s,
        max_live_traces=live_limit,
        hooks=InMemoryHooks(),
        clock=clock,
        policy=settings.assembly_policy,
        rules_for=lambda tenant: acme if tenant == "acme" else rules.for_tenant(tenant),
        checkpoint_interval_s=settings.checkpoint_interval_s,
        decision_cache_max=settings.decision_cache_max_traces,
        partitions=4,
    )


def bench_live(live: int, decision_cache_s: float) -> None:
    clock = Clock()
    asm = assembler(clock, live_limit=live * 2, decision_cache_s=decision_cache_s)
    print(f"-- decision cache {decision_cache_s:g}s (0: closed traces are only forwarded)")
    base = rss_mib()
    started = time.perf_counter()
    for seq, first in enumerate(range(0, live, 500)):
        asm.add(batch(first, min(500, live - first), 20), seq, offset=seq)
        if (seq + 1) % 20 == 0:
            asm.close_due()
    asm.close_due()
    add_s = time.perf_counter() - started
    grown = rss_mib() - base
    print(f"live: {asm.live_traces} traces x 20 spans held; RSS +{grown:.0f} MiB ({rss_mib():.0f} MiB total)")
    print(
        f"live: {grown * 1024 / max(asm.live_traces, 1):.1f} KiB per live trace; "
        f"add {live * 20 / add_s:,.0f} spans/s"
    )
    clock.now += 10
    started = time.perf_counter()
    closed = asm.close_due()
    close_s = time.perf_counter() - started
    n = closed.traces if closed else 0
    print(f"close: {n} traces ({n * 20} spans) closed and judged in {close_s:.2f}s")
    if closed and n:
        written = sum(len(w.value or b"") for w in closed.writes)
        print(
            f"close: state changelog {written / n:,.0f} bytes per closed trace; RSS {rss_mib():.0f} MiB total"
        )
    total = live * 20
    print(f"throughput (add + close, with demo rules): {total / (add_s + close_s):,.0f} spans/s on one core")


def bench_huge(spans: int) -> None:
    clock = Clock()
    asm = assembler(clock, live_limit=1000)
    base = rss_mib()
    peak = base
    started = time.perf_counter()
    step = 20_000
    for i, start in enumerate(range(0, spans, step)):
        asm.add(batch(7, 1, min(step, spans - start), start=start), i, offset=i)
        asm.close_due()
        clock.now += 0.01
        peak = max(peak, rss_mib())
    clock.now += 10
    closed = asm.close_due()
    took = time.perf_counter() - started
    print(
        f"huge: {spans:,} spans of one trace in {took:.1f}s ({spans / took:,.0f} spans/s), "
        f"RSS growth peak {peak - base:.0f} MiB, signals {len(closed.signals) if closed else 0}"
    )


def bench_steady(messages: int) -> None:
    """A continuous stream: traces open, go idle and close every tick (batches built beforehand)."""
    clock = Clock()
    asm = assembler(clock, live_limit=10**6)
    batches = [batch(i * 500, 500, 20, start=i * 10_000) for i in range(messages)]
    spans = sum(b.num_rows for b in batches)
    closed = 0
    cpu, wall = time.process_time(), time.perf_counter()
    for seq, b in enumerate(batches):
        asm.add(b, seq, offset=seq)
        clock.now += 0.05  # 20 messages/s: a trace closes 100 messages after it went idle
        out = asm.close_due()
        closed += out.traces if out else 0
    clock.now += 3600
    out = asm.close_due()
    closed += out.traces if out else 0
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    print(
        f"steady: {spans:,} spans ({closed:,} traces) added and closed, decision cache on: "
        f"{spans / cpu:,.0f} spans/s CPU ({cpu:.2f}s), {spans / wall:,.0f} spans/s wall ({wall:.2f}s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--live", type=int, default=100_000)
    parser.add_argument("--huge", type=int, default=1_000_000)
    parser.add_argument("--steady", type=int, default=0, help="messages of 10,000 spans (0: skip)")
    parser.add_argument(
        "--default-gc", action="store_true", help="keep CPython's GC thresholds (the worker tunes them)"
    )
    parser.add_argument(
        "--sequence",
        action="append",
        default=[],
        metavar="EXPR",
        help="add a sequence rule for the tenant, e.g. 'db.query followed_by pii.access within 1ns'",
    )
    parser.add_argument(
        "--traceql",
        action="append",
        default=[],
        metavar="EXPR",
        help='add a TraceQL rule for the tenant, e.g. \'{ name = "db.query" } >> { name = "pii.access" }\'',
    )
    args = parser.parse_args()
    for language, expressions in (("sequence", args.sequence), ("traceql", args.traceql)):
        for i, expression in enumerate(expressions):
            rule_id = f"{language[:3]}{i}"
            EXTRA.append(
                compile_rule(
                    Rule(id=rule_id, tenant="acme", name=expression, language=language, expression=expression)
                )
            )
            print(f"rule {rule_id}: {expression}")
    if not args.default_gc:
        tune_gc()
    print(f"start RSS {rss_mib():.0f} MiB")
    if args.huge:
        bench_huge(args.huge)
    if args.live:
        bench_live(args.live, 300.0)
        bench_live(args.live, 0.0)
    if args.steady:
        bench_steady(args.steady)


if __name__ == "__main__":
    main()
