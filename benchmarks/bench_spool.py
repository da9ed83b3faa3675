"""Spool benchmark: append N items durably, then sync them after "recovery" into real sinks.

Target (issue 7): sync after recovery completes within 5 s for 100k pending items.

Two sinks, each through the worker's own path (``SpooledWriter`` + breaker):

* spans: N spans spooled in Arrow batches of ``--batch-rows`` while the
  ``duckdb`` breaker is open, then replayed into a real tenant DuckDB file
  (``upsert_spans``: spans + trace summaries, one transaction per batch);
* signals: N signal documents spooled in batches of ``--signal-batch`` while the
  breaker is open, then replayed into the signals table (``insert_signals``
  + ``mark_emitted``; publishing is a no-op here, Kafka is not part of this).

Also: append throughput (one fsync per appended batch) and a replay twice over
the same spool (the idempotence check: the second pass stores nothing new).

    .venv/bin/python benchmarks/bench_spool.py --items 100000
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import pyarrow as pa  # noqa: E402

from betrace.config import load_settings  # noqa: E402
from betrace.metrics import InMemoryHooks  # noqa: E402
from betrace.resilience.wiring import Resilience  # noqa: E402
from betrace.sinks.duckdb_store import SpanStoreSink, TenantStore  # noqa: E402
from betrace.sinks.signals import SignalSink  # noqa: E402
from betrace.streams.schemas import SPAN_SCHEMA  # noqa: E402


def spans(first: int, n: int) -> pa.Table:
    return pa.table(
        {
            "tenant": ["acme"] * n,
            "trace_id": [f"{(first + i) // 10:032x}" for i in range(n)],
            "span_id": [f"{first + i + 1:016x}" for i in range(n)],
            "parent_span_id": [None] * n,
            "name": ["db.query"] * n,
            "service": ["svc"] * n,
            "kind": [1] * n,
            "status_code": [0] * n,
            "start_ns": list(range(first, first + n)),
            "end_ns": list(range(first + 1, first + n + 1)),
            "attributes": ['{"db.system":"postgres","k":1}'] * n,
            "resource_attributes": ['{"service.name":"svc"}'] * n,
            "produced_ms": [0] * n,
        },
        schema=SPAN_SCHEMA,
    )


def signal(n: int) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "signal_id": f"{n:032x}",
        "tenant": "acme",
        "rule_id": "pii-audit",
        "rule_version": 1,
        "rule_name": "PII access is audited",
        "trace_id": f"{n:032x}",
        "span_ids": [f"{n:016x}"],
        "severity": "high",
        "message": "pii.access without audit.log",
        "detected_at": "2026-11-25T02:47:08.165Z",
        "source_produced_ms": 1_795_574_826_312,
    }


async def bench_spans(res: Resilience, store: TenantStore, items: int, batch_rows: int) -> dict[str, float]:
    sink = SpanStoreSink(store, max_rows=batch_rows, hooks=InMemoryHooks())
    res.guard_span_sink(sink, [])
    assert sink.writer is not None
    assert sink.breaker is not None
    batches = [spans(i, min(batch_rows, items - i)) for i in range(0, items, batch_rows)]
    sink.breaker.open()
    started = time.perf_counter()
    for batch in batches:
        await sink.write([batch])
    appended = time.perf_counter() - started
    spool_bytes = sink.writer.spool.size_bytes
    sink.breaker.close()
    started = time.perf_counter()
    replayed = await sink.writer.drain()
    synced = time.perf_counter() - started
    assert replayed == items, replayed
    # Idempotence: the same items again through the direct path store nothing new.
    before = sink.stored
    for batch in batches[: max(1, len(batches) // 4)]:
        await sink.write([batch])
    assert sink.stored == before
    return {"append_s": appended, "sync_s": synced, "bytes": spool_bytes}


async def bench_signals(res: Resilience, store: TenantStore, items: int, batch: int) -> dict[str, float]:
    async def publish(docs: list[dict[str, Any]]) -> None:
        del docs

    sink = SignalSink(store, publish, max_items=batch, hooks=InMemoryHooks())
    res.guard_signal_sink(sink, [])
    assert sink.writer is not None
    assert sink.breaker is not None
    sink.breaker.open()
    started = time.perf_counter()
    for i in range(0, items, batch):
        await sink.write([signal(n) for n in range(i, min(items, i + batch))])
    appended = time.perf_counter() - started
    sink.breaker.close()
    started = time.perf_counter()
    replayed = await sink.writer.drain()
    synced = time.perf_counter() - started
    assert replayed == items, replayed
    assert sink.emitted == items, sink.emitted
    return {"append_s": appended, "sync_s": synced}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--batch-rows", type=int, default=1_000, help="spans per spooled batch")
    parser.add_argument("--signal-batch", type=int, default=500, help="signals per spooled batch")
    args = parser.parse_args()
    print(f"python {platform.python_version()}, {platform.machine()}, items={args.items:,}")
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        cfg = load_settings(
            data_dir=Path(tmp) / "data",
            resilience={"spool_dir": str(Path(tmp) / "spool"), "breaker_reset_timeout_seconds": 3600},
        )
        res = Resilience.build(cfg)
        store = TenantStore(cfg.data_dir)
        try:
            s = asyncio.run(bench_spans(res, store, args.items, args.batch_rows))
            print(
                f"spans:   append {args.items:,} in {s['append_s']:.2f}s "
                f"({args.items / s['append_s']:,.0f}/s, {s['bytes'] / 2**20:.1f} MiB, "
                f"{args.items // args.batch_rows} fsyncs); "
                f"sync after recovery {s['sync_s']:.2f}s ({args.items / s['sync_s']:,.0f}/s)"
            )
            g = asyncio.run(bench_signals(res, store, args.items, args.signal_batch))
            print(
                f"signals: append {args.items:,} in {g['append_s']:.2f}s; "
                f"sync after recovery {g['sync_s']:.2f}s ({args.items / g['sync_s']:,.0f}/s)"
            )
            ok = s["sync_s"] < 5 and g["sync_s"] < 5
            print(f"target: sync of {args.items:,} pending items < 5 s: {'met' if ok else 'NOT met'}")
        finally:
            res.close()
            store.close()


if __name__ == "__main__":
    main()
