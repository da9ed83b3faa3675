"""Archival throughput and trace-by-id latency over cold data.

    .venv/bin/python benchmarks/bench_archive.py [--spans 10000000] [--lookups 200] [--dir DIR]

Generates ``--spans`` spans (traces of 10 spans, one UTC day) straight into a
tenant DuckDB file with SQL (not through Kafka), archives that day to a
filesystem cold store with the real job (export -> upload -> verify, then
cleanup; each phase timed by the job's own ``betrace_archive_phase_seconds``
observations), then times ``--lookups`` random trace-by-id lookups through the
query API's code path (``ColdCatalog.attach`` + ``queries.get_trace``) now that
the day is cold only. Targets (issue 6): export+upload+verify of 10 M spans
< 60 s; cold trace-by-id lookup < 200 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import random
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from betrace.api import queries
from betrace.archive.coldread import ColdCatalog
from betrace.archive.job import ArchiveJob
from betrace.archive.synthetic import fill_day
from betrace.config.sections import ArchiveSettings
from betrace.metrics import InMemoryHooks
from betrace.sinks.cold import FilesystemColdStorage
from betrace.sinks.duckdb_store import TenantStore


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--spans", type=int, default=10_000_000)
    parser.add_argument("--lookups", type=int, default=200)
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: a temporary one)")
    args = parser.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="bench-archive-"))
    work.mkdir(parents=True, exist_ok=True)
    today = dt.datetime.now(dt.UTC).date()
    day = today - dt.timedelta(days=2)
    store = TenantStore(work / "data")
    try:
        t0 = time.perf_counter()
        fill_day(
            store.connection("bench"), "bench", day, spans=args.spans, spans_per_trace=10, signals=10_000
        )
        gen_s = time.perf_counter() - t0
        with store.cursor("bench") as con:
            row = con.execute("SELECT count(*), count(DISTINCT trace_id) FROM spans").fetchone()
            assert row is not None
            spans, traces = int(row[0]), int(row[1])
            ids = [
                r[0] for r in con.execute("SELECT DISTINCT trace_id FROM spans USING SAMPLE 2000").fetchall()
            ]
        print(f"generated {spans:,} spans in {traces:,} traces in {gen_s:.1f} s (not timed below)")

        cold = FilesystemColdStorage(work / "cold")
        hooks = InMemoryHooks()
        job = ArchiveJob(store, cold, ArchiveSettings(hot_days=0), hooks=hooks)
        t0 = time.perf_counter()
        report = asyncio.run(job.run(["bench"], day))
        total_s = time.perf_counter() - t0
        assert {u.state for u in report.units} == {"cleaned"}, report.units
        phases = {
            phase: sum(
                v
                for (name, labels), vals in hooks.observations.items()
                if name == "betrace_archive_phase_seconds" and dict(labels)["phase"] == phase
                for v in vals
            )
            for phase in ("export", "upload", "verify", "cleanup")
        }
        euv = phases["export"] + phases["upload"] + phases["verify"]
        size = sum(u.bytes for u in report.units)
        print(
            f"archive: export {phases['export']:.1f} s, upload {phases['upload']:.1f} s, verify "
            f"{phases['verify']:.1f} s -> export+upload+verify {euv:.1f} s "
            f"({spans / euv:,.0f} spans/s; target < 60 s); cleanup {phases['cleanup']:.1f} s; "
            f"whole run {total_s:.1f} s; {size / 2**20:.1f} MiB of Parquet ({size / spans:.1f} B/span)"
        )

        catalog = ColdCatalog(cold)
        sample = random.Random(7).sample(ids, min(args.lookups, len(ids)))
        latencies = []
        with store.cursor("bench") as con:
            assert con.execute("SELECT count(*) FROM spans").fetchone() == (0,), "the day should be cold only"
            for trace_id in sample:
                t0 = time.perf_counter()
                found = queries.get_trace(con, trace_id, tables=catalog.attach(con))
                latencies.append((time.perf_counter() - t0) * 1000)
                assert found is not None
                assert len(found["spans"]) == 10
        latencies.sort()
        p50 = statistics.median(latencies)
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        print(
            f"cold trace-by-id over {len(latencies)} lookups: p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
            f"min {latencies[0]:.1f} ms, max {latencies[-1]:.1f} ms (target < 200 ms)"
        )
        print(f"peak RSS {rss_mib():.0f} MiB")
    finally:
        store.close()
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
