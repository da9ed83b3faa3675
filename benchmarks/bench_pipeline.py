"""End-to-end pipeline benchmark through the real local Kafka broker.

Backlog mode (default): pre-produce N spans, start worker processes, and time
from the first committed input offset to the moment every span is stored,
every trace is closed and every expected signal has arrived.

Rate mode (--rate R): produce at R spans/s while the workers run and report
produce-to-signal latency percentiles (these include the idle timeout that
closes a trace, which is printed with them).

    .venv/bin/python benchmarks/bench_pipeline.py --spans 500000 --workers 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # noqa: E402

from betrace.api.signals import tail_signals  # noqa: E402
from betrace.cli.demo import demo_settings  # noqa: E402
from betrace.config import load_settings  # noqa: E402
from betrace.dev.kafka import LocalKafka  # noqa: E402
from betrace.dev.worker import WorkerProcess  # noqa: E402
from betrace.errors import BrokerError  # noqa: E402
from betrace.streams.admin import ensure_topics  # noqa: E402
from betrace.streams.lag import group_lag  # noqa: E402
from betrace.workload.generator import TraceGenerator  # noqa: E402
from betrace.workload.otlp import batch_messages  # noqa: E402
from betrace.workload.producer import produce  # noqa: E402

SPLIT = False  # --split-ingest: ingest runs in its own process and consumer group


async def committed_total(cfg, topics):  # type: ignore[no-untyped-def]
    """Committed offsets and lag over ``topics``, each read from the group that consumes it."""
    groups = {cfg.app_id: [t for t in topics if not (SPLIT and t == cfg.topics.input)]}
    if SPLIT and cfg.topics.input in topics:
        groups[f"{cfg.app_id}.ingest"] = [cfg.topics.input]
    done = lag = 0
    for group, group_topics in groups.items():
        if not group_topics:
            continue
        try:
            lags = await group_lag(cfg.brokers, group, group_topics)
        except BrokerError:
            return 0, None
        done += sum(max(p.committed or 0, 0) for p in lags)
        lag += sum(p.lag for p in lags)
    return done, lag


async def backlog(args: argparse.Namespace, cfg, workers):  # type: ignore[no-untyped-def]
    gen = TraceGenerator(tenants=tuple(args.tenants.split(",")), violation_rate=0.05, seed=11)
    msgs = list(batch_messages(gen.traces(args.spans), spans_per_message=args.spans_per_message))
    stats = await produce(cfg, msgs)
    print(f"pre-produced {stats.spans:,} spans in {stats.messages:,} messages ({stats.spans_per_s:,.0f}/s)")
    expected = gen.truth.expected
    received: list[dict] = []
    t_launch = time.monotonic()
    for w in workers:
        w.start()
    t_first = None
    while t_first is None:
        done, _ = await committed_total(cfg, [cfg.topics.input])
        if done > 0:
            t_first = time.monotonic()
        elif time.monotonic() - t_launch > 120:
            raise SystemExit("workers did not start: " + workers[0].log_tail())
        await asyncio.sleep(0.05)
    print(f"workers consuming after {t_first - t_launch:.1f}s (startup, not counted)")
    await tail_signals(
        cfg,
        received.append,
        from_beginning=True,
        timeout_s=600,
        stop=lambda: {(d["tenant"], d["rule_id"], d["trace_id"]) for d in received} >= expected,
    )
    t_signals = time.monotonic()
    while True:
        _, lag = await committed_total(cfg, [cfg.topics.input, cfg.topics.spans, cfg.topics.traces])
        if lag == 0:
            break
        await asyncio.sleep(0.05)
    t_done = time.monotonic()
    span = max(t_signals, t_done) - t_first
    detected = {(d["tenant"], d["rule_id"], d["trace_id"]) for d in received}
    return {
        "spans": stats.spans,
        "seconds": round(span, 2),
        "spans_per_s": round(stats.spans / span),
        "expected_signals": len(expected),
        "signals": len(received),
        "missing": len(expected - detected),
        "unexpected": len(detected - expected),
    }


async def signal_latencies(cfg, out: list, expected: int, timeout_s: float) -> None:  # type: ignore[no-untyped-def]
    """Produce-to-signal latency: the signal record's timestamp minus its trace's last span record's."""
    consumer = AIOKafkaConsumer(
        cfg.topics.signals, bootstrap_servers=cfg.brokers, auto_offset_reset="earliest"
    )
    await consumer.start()
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < expected and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                out.extend(r.timestamp - json.loads(r.value)["source_produced_ms"] for r in records)
    finally:
        await consumer.stop()


async def rate(args: argparse.Namespace, cfg, workers):  # type: ignore[no-untyped-def]
    for w in workers:
        w.start()
    await asyncio.sleep(8)
    gen = TraceGenerator(tenants=tuple(args.tenants.split(",")), violation_rate=0.2, seed=12)
    msgs = list(batch_messages(gen.traces(args.spans), spans_per_message=args.spans_per_message))
    latencies: list[float] = []
    tail = asyncio.create_task(
        signal_latencies(cfg, latencies, len(gen.truth.expected), args.spans / args.rate + 60)
    )
    t0 = time.monotonic()
    prod = AIOKafkaProducer(bootstrap_servers=cfg.brokers, linger_ms=5)
    await prod.start()
    try:
        per_msg = args.spans_per_message / args.rate
        for i, m in enumerate(msgs):
            delay = t0 + i * per_msg - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await prod.send(cfg.topics.input, m.value, headers=[(cfg.tenant_header, m.tenant.encode())])
        await prod.flush()
    finally:
        await prod.stop()
    achieved = gen.truth.spans / (time.monotonic() - t0)
    await tail
    latencies.sort()
    pct = lambda q: round(latencies[min(len(latencies) - 1, int(len(latencies) * q))]) if latencies else None  # noqa: E731
    return {
        "target_rate": args.rate,
        "achieved_rate": round(achieved),
        "signals": len(latencies),
        "expected_signals": len(gen.truth.expected),
        "latency_p50_ms": pct(0.5),
        "latency_p99_ms": pct(0.99),
        "idle_timeout_s": cfg.idle_timeout_s,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spans", type=int, default=500_000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--tenants", default="default,acme")
    p.add_argument("--spans-per-message", type=int, default=200)
    p.add_argument("--idle-timeout", type=float, default=0.5)
    p.add_argument("--split-ingest", action="store_true", help="ingest in its own process (BETRACE_STAGES)")
    p.add_argument("--rate", type=float, default=None, help="spans/s; enables latency mode")
    p.add_argument("--external", action="store_true", help="use BETRACE_BROKERS, do not start Kafka")
    args = p.parse_args()

    base = load_settings()
    if not args.external:
        kafka = LocalKafka(ROOT)
        kafka.up()
        base = base.model_copy(update={"brokers": kafka.bootstrap_servers})
    run_id = "bench-" + time.strftime("%Y%m%d-%H%M%S")
    cfg = demo_settings(base, run_id, ROOT / ".dev" / "bench", args.idle_timeout)
    cfg = cfg.model_copy(
        update={
            "topics": cfg.topics.model_copy(update={"partitions": args.partitions}),
            "rules_dir": ROOT / "config" / "rules",
            "log_level": "WARNING",
        }
    )
    asyncio.run(ensure_topics(cfg))
    global SPLIT  # noqa: PLW0603 - a flag of this script's one run
    SPLIT = args.split_ingest
    stage = "downstream" if SPLIT else "all"
    workers = [
        WorkerProcess(
            cfg.model_copy(update={"stages": stage}), ROOT / ".dev" / "bench" / f"{run_id}.worker{i}.log"
        )
        for i in range(args.workers)
    ]
    if SPLIT:
        ingest_cfg = cfg.model_copy(update={"stages": "ingest"})
        workers.append(WorkerProcess(ingest_cfg, ROOT / ".dev" / "bench" / f"{run_id}.ingest.log"))
    try:
        result = asyncio.run(rate(args, cfg, workers) if args.rate else backlog(args, cfg, workers))
    finally:
        for w in workers:
            w.stop()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()
    result.update(
        {
            "split_ingest": args.split_ingest,
            "workers": args.workers,
            "partitions": args.partitions,
            "commit": commit,
            "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "date": time.strftime("%Y-%m-%d"),
        }
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
