"""Sink benchmarks on real files: embedded-ledger batch latency and DuckDB span appends.

Ledger: signals recorded through ``SignalLedger`` (the worker's path), flushed
by the 128-item trigger; every ``create_transfers`` request is timed and p50 /
p99 / max reported, for fresh signals and for a full replay (all ``exists``).

Span store: Arrow batches of ``--batch-rows`` spans written through the worker's
``SpanStoreSink`` as the worker does when behind: a full buffer (``--flush-rows``)
writes each tenant's whole DuckDB row groups and keeps the rest (``--no-align``:
writes everything), spans + per-trace summaries in one transaction per tenant;
timed up to and including a final checkpoint of every file. ``--store-tenants N``
deals the traces to N tenant files.

    .venv/bin/python benchmarks/bench_sinks.py --signals 50000 --spans 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import pyarrow as pa  # noqa: E402
from harness import probes  # noqa: E402

from betrace.config import Settings  # noqa: E402
from betrace.metrics import InMemoryHooks  # noqa: E402
from betrace.sinks.duckdb_store import (  # noqa: E402
    DEFAULT_CHECKPOINT_MIB,
    DEFAULT_MEMORY_MIB,
    SpanStoreSink,
    TenantStore,
)
from betrace.sinks.ledger import EmbeddedLedger, SignalLedger  # noqa: E402
from betrace.streams.schemas import SPAN_SCHEMA  # noqa: E402

#: The sink flushes a tenant batch at this many rows (the setting's default).
FLUSH_ROWS: int = Settings.model_fields["store_flush_rows"].default


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class TimedLedger(EmbeddedLedger):
    """The embedded ledger, recording how long each create_transfers request takes."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.latencies: list[float] = []
        self.sizes: list[int] = []

    def create_transfers(self, transfers):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        try:
            return super().create_transfers(transfers)
        finally:
            self.latencies.append(time.perf_counter() - started)
            self.sizes.append(len(transfers))


def signal_docs(n: int, tenants: int, rules: int) -> list[dict[str, object]]:
    rng = random.Random(5)
    return [
        {
            "tenant": f"tenant-{rng.randrange(tenants)}",
            "rule_id": f"rule-{rng.randrange(rules)}",
            "rule_version": 1,
            "trace_id": f"{rng.getrandbits(128):032x}",
            "severity": "high",
            "source_produced_ms": 1_795_574_826_312 + i,
        }
        for i in range(n)
    ]


async def bench_ledger(args: argparse.Namespace, workdir: Path) -> None:
    ledger = TimedLedger(workdir / "ledger.duckdb")
    signals = SignalLedger(ledger, hooks=InMemoryHooks())
    docs = signal_docs(args.signals, args.tenants, args.rules)
    chunk = 500  # signals per SignalSink batch, as a Kafka batch would bring them
    for phase in ("fresh", "replay"):
        ledger.latencies.clear()
        ledger.sizes.clear()
        started = time.perf_counter()
        for i in range(0, len(docs), chunk):
            by_tenant: dict[object, list[dict[str, object]]] = {}
            for doc in docs[i : i + chunk]:
                by_tenant.setdefault(doc["tenant"], []).append(doc)
            for tenant_docs in by_tenant.values():
                await signals.record(tenant_docs)
        elapsed = time.perf_counter() - started
        lat = ledger.latencies
        print(
            f"ledger {phase:6}: {len(docs):,} signals in {elapsed:.2f}s ({len(docs) / elapsed:,.0f}/s); "
            f"{len(lat):,} requests of mean {sum(ledger.sizes) / len(lat):.0f} transfers; "
            f"latency p50 {pct(lat, 0.50) * 1e3:.2f} ms, p99 {pct(lat, 0.99) * 1e3:.2f} ms, "
            f"max {max(lat) * 1e3:.2f} ms"
        )
    counted = sum(
        c.signals
        for t in range(args.tenants)
        for r in range(args.rules)
        for c in signals.counts(f"tenant-{t}", f"rule-{r}")
    )
    print(f"ledger counters: {counted:,} signals (expected {len(docs):,})")
    await signals.close()


def span_batches(total: int, batch_rows: int, tenants: int = 1) -> list[pa.Table]:
    rng = random.Random(3)
    batches = []
    services = [f"svc-{i}" for i in range(12)]
    names = ["GET /api", "db.query", "pii.access", "audit.log", "cache.get", "render"]
    now = time.time_ns()
    for start in range(0, total, batch_rows):
        n = min(batch_rows, total - start)
        trace_ids = [f"{rng.getrandbits(128):032x}" for _ in range(n // 8 + 1)]
        rows = {
            # Traces of 8 spans, dealt round-robin to the tenants (one tenant: "bench").
            "tenant": ["bench"] * n
            if tenants == 1
            else [f"bench-{((start + i) // 8) % tenants}" for i in range(n)],
            "trace_id": [trace_ids[i // 8] for i in range(n)],
            "span_id": [f"{start + i:016x}" for i in range(n)],
            "parent_span_id": [None if i % 8 == 0 else f"{start + i - i % 8:016x}" for i in range(n)],
            "name": [names[i % len(names)] for i in range(n)],
            "service": [services[i % len(services)] for i in range(n)],
            "kind": [1] * n,
            "status_code": [2 if i % 50 == 0 else 0 for i in range(n)],
            "start_ns": [now + (start + i) * 1000 for i in range(n)],
            "end_ns": [now + (start + i) * 1000 + 500 for i in range(n)],
            "attributes": ['{"http.method":"GET","user.id":"u' + str(i % 1000) + '"}' for i in range(n)],
            "resource_attributes": ['{"service.name":"x"}'] * n,
            "produced_ms": [now // 1_000_000] * n,
        }
        batches.append(pa.Table.from_pydict(rows, schema=SPAN_SCHEMA))
    return batches


async def through_sink(
    store: TenantStore, batches: list[pa.Table], flush_rows: int, *, align: bool, rss: list[tuple[int, int]]
) -> int:
    """As the worker's span sink writes when it is behind: batches arrive, a full buffer is
    flushed (``align``: each tenant's whole row groups, the rest kept), then a final flush.
    ``rss`` gets (rows added, process RSS) after every flush."""
    sink = SpanStoreSink(store, max_rows=flush_rows, hooks=InMemoryHooks())
    added = 0
    for batch in batches:
        if sink.full:
            await (sink.flush_aligned() if align else sink.flush())
            rss.append((added, probes.rss_bytes(os.getpid()) or 0))
        sink.add(batch, size=batch.num_rows)
        added += batch.num_rows
    await sink.flush()
    rss.append((added, probes.rss_bytes(os.getpid()) or 0))
    return sink.stored


def rss_growth(rss: list[tuple[int, int]], base: int, total: int) -> str:
    """RSS growth over ``base`` after a third, two thirds and all of the rows."""
    marks = []
    for frac in (1 / 3, 2 / 3, 1.0):
        added, value = next(((a, v) for a, v in rss if a >= frac * total), rss[-1])
        marks.append(f"+{(value - base) / 2**20:,.0f} MiB after {added:,}")
    return ", ".join(marks)


def bench_store(args: argparse.Namespace, workdir: Path) -> None:
    batches = span_batches(args.spans, args.batch_rows, args.store_tenants)
    store = TenantStore(workdir / "data", checkpoint_mib=args.checkpoint_mib, memory_mib=args.memory_mib)
    rss: list[tuple[int, int]] = []
    try:
        base = probes.rss_bytes(os.getpid()) or 0
        started = time.perf_counter()
        stored = asyncio.run(through_sink(store, batches, args.flush_rows, align=not args.no_align, rss=rss))
        appended = time.perf_counter() - started
        print(f"span store RSS (batches built before the start): {rss_growth(rss, base, args.spans)}")
        # The checkpoint a larger WAL threshold defers is part of the cost: time it too.
        for tenant in store.tenants():
            with store.cursor(tenant) as con:
                con.execute("CHECKPOINT")
        elapsed = time.perf_counter() - started
        print(
            f"span store: {stored:,} spans of {args.store_tenants} tenant(s) in {len(batches)} "
            f"batches of {args.batch_rows:,}, flushed at {args.flush_rows:,} rows "
            f"({'whole row groups' if not args.no_align else 'everything'}) "
            f"in {elapsed:.2f}s = {stored / elapsed:,.0f} rows/s "
            f"(spans + trace summaries, final checkpoint {elapsed - appended:.2f}s included)"
        )
        if args.store_tenants > 1:
            return
        started = time.perf_counter()
        again = sum(store.insert_spans("bench", b) for b in batches[: max(1, len(batches) // 4)])
        print(f"span store replay of 1/4: {again} new rows in {time.perf_counter() - started:.2f}s")
        with store.cursor("bench") as con:
            trace_id = batches[-1].column("trace_id")[0].as_py()
            started = time.perf_counter()
            con.execute("SELECT * FROM spans WHERE trace_id = ?", [trace_id]).fetchall()
            print(f"span store: one trace by id in {(time.perf_counter() - started) * 1e3:.1f} ms")
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--signals", type=int, default=50_000)
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--rules", type=int, default=5)
    parser.add_argument("--spans", type=int, default=1_000_000)
    parser.add_argument(
        "--batch-rows", type=int, default=10_000, help="spans per arriving Arrow batch (default 10,000)"
    )
    parser.add_argument(
        "--flush-rows",
        type=int,
        default=FLUSH_ROWS,
        help=f"rows the sink buffers before it must flush (default {FLUSH_ROWS:,}: BETRACE_STORE_FLUSH_ROWS)",
    )
    parser.add_argument(
        "--no-align",
        action="store_true",
        help="flush the whole buffer when full, not each tenant's whole row groups (for comparison)",
    )
    parser.add_argument(
        "--store-tenants",
        type=int,
        default=1,
        help="spread the spans over this many tenant files (each flush: one transaction per tenant)",
    )
    parser.add_argument("--only", choices=("ledger", "store"), default=None)
    parser.add_argument(
        "--checkpoint-mib", type=int, default=DEFAULT_CHECKPOINT_MIB, help="WAL size that checkpoints a file"
    )
    parser.add_argument(
        "--memory-mib",
        type=int,
        default=DEFAULT_MEMORY_MIB,
        help=f"the store's DuckDB memory limit (default {DEFAULT_MEMORY_MIB}: BETRACE_STORE_MEMORY_MIB)",
    )
    args = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} python {platform.python_version()} on {platform.machine()}")
    with tempfile.TemporaryDirectory(prefix="betrace-bench-") as tmp:
        if args.only in (None, "ledger"):
            asyncio.run(bench_ledger(args, Path(tmp)))
        if args.only in (None, "store"):
            bench_store(args, Path(tmp))


if __name__ == "__main__":
    main()
