"""The signal sink on a busy event loop: time per batch, and per step.

In a loaded worker the signal sink's DuckDB and ledger calls run on writer
threads, and every call waits for the GIL while the event loop runs Python
(the assembly close tick holds it for 20-200 ms at a time at 3,000 spans/s).
This runs the worker's ``SignalSink`` in process on real files (one
``TenantStore``, its tenant ledgers on the same DuckDB instance, the DuckDB
audit trail), publishing to nothing, while a coroutine keeps the loop busy
with pure-Python work for ``--busy-ms`` out of every ``--period-ms``. Batches
of ``--signals`` candidate signals spread over ``--tenants`` tenants, as the
sink sees them at 3,000 spans/s (about 5 signals over 4 tenants).

    .venv/bin/python benchmarks/bench_signal_sink.py --batches 150
    PYTHONPATH=<other tree>/src .venv/bin/python benchmarks/bench_signal_sink.py   # another tree

Prints p50 / p90 / p99 of ``write_now`` per batch and of each step, for
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import platform
import random
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

if "PYTHONPATH" not in os.environ:  # this tree's package unless another is named
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from betrace.audit.recorder import DuckDBAuditRecorder
from betrace.metrics import InMemoryHooks
from betrace.sinks.duckdb_store import TenantStore
from betrace.sinks.ledger import TenantLedgers
from betrace.sinks.signals import SignalSink

STEPS: dict[str, list[float]] = defaultdict(list)


def timed_async(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await fn(*args, **kwargs)
        finally:
            STEPS[name].append(time.perf_counter() - started)

    return wrapper


def timed_sync(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            STEPS[name].append(time.perf_counter() - started)

    return wrapper


def instrument() -> None:
    """Time the sink's steps (the same names in every tree since 3700002)."""
    SignalSink._record = timed_sync("record (thread)", SignalSink._record)  # type: ignore[method-assign]
    SignalSink._mark = timed_sync("mark (thread)", SignalSink._mark)  # type: ignore[method-assign]
    SignalSink._audit_emitted = timed_async("audit", SignalSink._audit_emitted)  # type: ignore[method-assign]
    TenantLedgers.record = timed_async("ledger", TenantLedgers.record)  # type: ignore[method-assign]


def doc(n: int, tenant: str, rng: random.Random) -> dict[str, Any]:
    trace = f"{rng.getrandbits(128):032x}"
    rule = f"rule-{rng.randrange(20)}"
    return {
        "schema_version": 1,
        "signal_id": f"{rng.getrandbits(128):032x}",
        "tenant": tenant,
        "rule_id": rule,
        "rule_version": 1,
        "rule_name": rule,
        "trace_id": trace,
        "span_ids": [f"{n:016x}"],
        "severity": "high",
        "message": "m",
        "detected_at": "2026-12-04T21:00:00.000Z",
        "source_produced_ms": int(time.time() * 1000),
    }


async def busy_loop(stop: asyncio.Event, busy_ms: float, period_ms: float) -> None:
    """Hold the event loop (and the GIL) in Python for ``busy_ms`` of every ``period_ms``."""
    while not stop.is_set():
        until = time.perf_counter() + busy_ms / 1000
        x = 0
        while time.perf_counter() < until:
            for i in range(200):
                x += i * i
        await asyncio.sleep(max(period_ms - busy_ms, 0) / 1000)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def run(args: argparse.Namespace, data_dir: Path) -> None:
    hooks = InMemoryHooks()
    store = TenantStore(data_dir)
    ledgers = TenantLedgers(data_dir, hooks=hooks, files=store.files)
    audit = DuckDBAuditRecorder(data_dir / "audit.duckdb", hooks=hooks)

    async def publish(_docs: list[dict[str, Any]]) -> None:
        await asyncio.sleep(0)

    sink = SignalSink(store, publish, max_items=100_000, hooks=hooks, ledger=ledgers, audit=audit)
    rng = random.Random(7)
    tenants = [f"t{i}" for i in range(args.tenants)]
    # Warm up: every tenant's files, ledger accounts and the audit schema exist.
    await sink.write_now([doc(0, t, rng) for t in tenants for _ in range(5)])
    STEPS.clear()
    stop = asyncio.Event()
    load = asyncio.create_task(busy_loop(stop, args.busy_ms, args.period_ms))
    started = time.perf_counter()
    for n in range(args.batches):
        batch = [doc(n, rng.choice(tenants[: args.batch_tenants]), rng) for _ in range(args.signals)]
        rng.shuffle(tenants)
        t0 = time.perf_counter()
        await sink.write_now(batch)
        STEPS["write_now (batch)"].append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - started
    stop.set()
    await load
    await ledgers.close()
    audit.close()
    store.close()
    print(
        f"{args.batches} batches of {args.signals} signals over up to {args.batch_tenants} of "
        f"{args.tenants} tenants, loop busy {args.busy_ms:.0f} of every {args.period_ms:.0f} ms: "
        f"{elapsed:.1f} s"
    )
    print(f"{'step':22s} {'n':>5s} {'p50 ms':>8s} {'p90 ms':>8s} {'p99 ms':>8s}")
    for name, values in STEPS.items():
        print(
            f"{name:22s} {len(values):5d} "
            f"{pct(values, 0.5):8.1f} {pct(values, 0.9):8.1f} {pct(values, 0.99):8.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, default=150)
    parser.add_argument("--signals", type=int, default=5, help="candidate signals per batch")
    parser.add_argument("--tenants", type=int, default=10)
    parser.add_argument("--batch-tenants", type=int, default=10, help="tenants a batch draws from")
    parser.add_argument("--busy-ms", type=float, default=60.0, help="Python work per period on the loop")
    parser.add_argument("--period-ms", type=float, default=125.0, help="the close tick's interval")
    args = parser.parse_args()
    if not 0 <= args.busy_ms <= args.period_ms:
        parser.error("--busy-ms must be between 0 and --period-ms")
    import betrace  # noqa: PLC0415

    print(
        f"betrace from {Path(betrace.__file__).parent}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cpus, Python {platform.python_version()}"
    )
    instrument()
    with tempfile.TemporaryDirectory(prefix="bench-signal-sink-") as tmp:
        asyncio.run(run(args, Path(tmp)))


if __name__ == "__main__":
    main()
