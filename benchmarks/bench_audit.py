"""The audit trail at 10 million events: children lookups, cursor pages, chains, batch writes.

    .venv/bin/python benchmarks/bench_audit.py [--events 10000000] [--lookups 300] [--dir DIR]

Generates ``--events`` events with SQL straight into ``audit.duckdb`` with the
real schema (composite primary key, self-referencing foreign key, the unique
``event_id`` index and the ``parent_event_id`` index): 10 % roots, 60 % their
children, 30 % grandchildren, inserted level by level as the recorder does.
Then it times, through :class:`betrace.audit.store.AuditStore` (which opens the
file read-only for each call, as the API and the CLI do):

* children of a random event (target < 50 ms), and the same query on an
  open connection, after asserting with ``EXPLAIN ANALYZE`` that it is an
  index scan;
* a cursor page of 100 events at a random position, unfiltered and with a
  tenant + type filter;
* a whole chain (ancestors + descendants) of a random grandchild and root;
* a recorder flush of 500 events (open, insert, commit, close) into the big file,
  and one of 5 events, what the signal sink writes per batch under load.

    PYTHONPATH=<other tree>/src .venv/bin/python benchmarks/bench_audit.py --events 200000  # another tree
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb

from betrace.audit.events import AuditEventType
from betrace.audit.recorder import DuckDBAuditRecorder
from betrace.audit.schema import CHILDREN_SQL, ensure_schema
from betrace.audit.store import AuditStore, EventFilter

T0 = 1_795_000_000_000_000_000  # ns, Nov 2026
STEP = 1_000_000  # 1 ms between events


def _eid(expr: str) -> str:
    return f"lpad(to_hex(({expr})::BIGINT), 32, '0')"


def _date(expr: str) -> str:
    return f"(DATE '2026-11-01' + (({expr}) // 1000000)::INT)"


def generate(path: Path, n: int) -> float:
    started = time.perf_counter()
    con = duckdb.connect(str(path))
    ensure_schema(con)
    levels = (("i % 10 = 0", None), ("i % 10 BETWEEN 1 AND 6", "i - i % 10"), ("i % 10 >= 7", "i - 6"))
    types = "['evaluation.batch', 'signal.emitted', 'ingestion_run.batch', 'rule.changed']"
    for where, parent in levels:
        pid = "NULL" if parent is None else _eid(parent)
        pdate = "NULL" if parent is None else _date(parent)
        con.execute(
            f"""INSERT INTO audit_events
            SELECT {_eid("i")}, {_date("i")}, {pid}, {pdate},
                   {types}[1 + (i % 4)], 'betrace-worker', 'tenant-' || (i % 20), 'subject ' || i, 'ok',
                   '{{"n": ' || i || '}}', {T0} + i * {STEP}, {T0} + i * {STEP}
            FROM range({n}) t(i) WHERE {where}"""
        )
        print(f"  generated level {where!r} after {time.perf_counter() - started:.1f} s", flush=True)
    con.close()
    return time.perf_counter() - started


def timed(fn: Callable[[], Any], runs: int) -> dict[str, float]:
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1000)
    samples.sort()
    return {
        "p50_ms": round(statistics.median(samples), 2),
        "p99_ms": round(samples[min(len(samples) - 1, int(len(samples) * 0.99))], 2),
        "max_ms": round(samples[-1], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--lookups", type=int, default=300)
    parser.add_argument("--dir", type=Path, default=None, help="keep the file here (default: a temp dir)")
    parser.add_argument("--reuse", action="store_true", help="with --dir: measure the file generated before")
    args = parser.parse_args()
    n = args.events
    workdir = args.dir or Path(tempfile.mkdtemp(prefix="bench-audit-"))
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "audit.duckdb"
    reuse = args.reuse and path.exists()
    if not reuse:
        path.unlink(missing_ok=True)
    rng = random.Random(7)
    try:
        gen_s = 0.0
        if reuse:
            print(f"reusing {path}", flush=True)
        else:
            print(f"generating {n:,} events in {path}", flush=True)
            gen_s = generate(path, n)
        size_mb = path.stat().st_size / 1e6
        store = AuditStore(path)

        def hex_id(i: int) -> str:
            return format(i, "X").rjust(32, "0")

        roots = [hex_id(rng.randrange(0, n // 10) * 10) for _ in range(args.lookups)]
        con = duckdb.connect(str(path), read_only=True)
        plan = "\n".join(
            str(r[1]) for r in con.execute(f"EXPLAIN ANALYZE {CHILDREN_SQL}", [roots[0]]).fetchall()
        )
        assert "Index Scan" in plan, plan
        assert "Sequential Scan" not in plan, plan
        assert len(con.execute(CHILDREN_SQL, [roots[0]]).fetchall()) == 6
        it = iter(roots * 2)
        warm = timed(lambda: con.execute(CHILDREN_SQL, [next(it)]).fetchall(), args.lookups)
        con.close()
        it2 = iter(roots)
        children = timed(lambda: store.children(next(it2), limit=100), args.lookups)

        def page(flt: EventFilter) -> None:
            i = rng.randrange(0, n - 1000)
            result = store.list_events(flt, limit=100, after=(T0 + i * STEP, hex_id(i)))
            assert len(result.items) == 100 or flt.tenant is not None

        pages = timed(lambda: page(EventFilter()), args.lookups)
        filtered = timed(
            lambda: page(EventFilter(tenant="tenant-3", event_types=("signal.emitted", "rule.changed"))),
            args.lookups // 3,
        )
        grandchildren = [hex_id(rng.randrange(0, n // 10) * 10 + 7) for _ in range(args.lookups // 3)]
        it3 = iter(grandchildren)
        chain_leaf = timed(lambda: store.chain(next(it3)), len(grandchildren))
        it4 = iter(roots)
        chain_root = timed(lambda: store.chain(next(it4)), args.lookups // 3)

        rec = DuckDBAuditRecorder(path, flush_events=100_000, flush_interval_s=3600)

        def write_batch(events: int) -> None:
            top = rec.record(AuditEventType.EVALUATION_BATCH, actor="bench", subject="batch", tenant="t")
            for i in range(events - 1):
                rec.record(
                    AuditEventType.SIGNAL_EMITTED, actor="bench", subject=f"s{i}", tenant="t", parent=top
                )
            rec.flush()

        writes = timed(lambda: write_batch(500), 10)
        small_writes = timed(lambda: write_batch(5), 50)
        rec.close()
        results = {
            "events": n,
            "generate_s": round(gen_s, 1),
            "file_mb": round(size_mb),
            "children_lookup_api_path (open+query+close)": children,
            "children_lookup_open_connection": warm,
            "cursor_page_100_unfiltered": pages,
            "cursor_page_100_tenant_and_type_filter": filtered,
            "chain_of_a_grandchild (2 ancestors)": chain_leaf,
            "chain_of_a_root (9 descendants)": chain_root,
            "recorder_flush_500_events": writes,
            "recorder_flush_5_events": small_writes,
        }
        for name, value in results.items():
            print(f"{name}: {value}")
        target = children["p99_ms"] < 50
        print(f"children lookup p99 < 50 ms: {'yes' if target else 'NO'}")
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
