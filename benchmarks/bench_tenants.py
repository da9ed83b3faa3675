"""Memory per tenant: one worker with many tenants configured and sending, minus one tenant.

Two load-test runs (``benchmarks/loadtest.py``) at the same rate and
duration: first with 1 tenant (baseline), then with ``--tenants`` tenants,
each with its own rule file (20 rules) and traffic from every one of them.
The worker's RSS after warm-up (mean over the last quarter of the load) of
the second run minus the first, divided by the extra tenants, is the memory
per tenant. Target (issue 10): under 50 MB per tenant with 500 tenants.

Before the runs, ``--store-only`` figures isolate the DuckDB part: the hot
store keeps one connection (one DuckDB database instance) open per tenant
file for the life of the worker, so this opens N tenant files in this
process, writes one small batch to each, and reports RSS, threads and open
files per connection.

    .venv/bin/python benchmarks/bench_tenants.py --tenants 500 --rate 5000 --duration 30
    .venv/bin/python benchmarks/bench_tenants.py --store-only --tenants 500
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import loadtest  # noqa: E402
from harness import probes  # noqa: E402

from betrace.config import load_settings  # noqa: E402

MB = 1024 * 1024


def store_cost(tenants: int) -> dict[str, Any]:
    """RSS, threads and file descriptors of ``tenants`` open tenant files in this process."""
    import pyarrow as pa  # noqa: PLC0415

    from betrace.sinks.duckdb_store import TenantStore  # noqa: PLC0415
    from betrace.streams.schemas import SPAN_SCHEMA  # noqa: PLC0415

    pid = os.getpid()
    rows = {name: [] for name in SPAN_SCHEMA.names}  # type: dict[str, list[Any]]
    for i in range(20):
        for name, value in {
            "tenant": "x", "trace_id": f"{i // 5:032x}", "span_id": f"{i + 1:016x}", "parent_span_id": None,
            "name": "db.query", "service": "svc", "kind": 3, "status_code": 0, "start_ns": 10**18 + i,
            "end_ns": 10**18 + i + 1000, "attributes": "{}", "resource_attributes": "{}", "produced_ms": 1,
        }.items():  # fmt: skip
            rows[name].append(value)
    batch = pa.table(rows, schema=SPAN_SCHEMA)
    with tempfile.TemporaryDirectory() as tmp:
        store = TenantStore(Path(tmp))
        store.insert_spans("warm", batch)  # imports, extension loading
        rss0, threads0 = probes.rss_bytes(pid) or 0, probes.thread_count(pid) or 0
        t0 = time.perf_counter()
        for i in range(tenants):
            store.insert_spans(f"t{i:03d}", batch)
        took = time.perf_counter() - t0
        rss1, threads1 = probes.rss_bytes(pid) or 0, probes.thread_count(pid) or 0
        files = probes.open_files(pid, ".duckdb") or 0
        wals = probes.open_files(pid, ".duckdb.wal") or 0
        store.close()
        rss2 = probes.rss_bytes(pid) or 0
    return {
        "tenants": tenants,
        "open_s": round(took, 2),
        "rss_delta_mib": round((rss1 - rss0) / MB, 1),
        "rss_per_tenant_mib": round((rss1 - rss0) / MB / tenants, 3),
        "threads_delta": threads1 - threads0,
        "open_duckdb_files": files,
        "open_wal_files": wals,
        "rss_released_on_close_mib": round((rss1 - rss2) / MB, 1),
    }


def steady_rss(result: dict[str, Any], worker: str = "w0") -> float:
    load = [s for s in result["samples"] if 0 < s["t"] <= result["config"]["duration_s"]]
    tail = load[-max(1, len(load) // 4) :]
    return mean(s["workers"][worker]["rss"] for s in tail if s["workers"][worker]["rss"]) / MB


def run_phase(tenants: int, args: argparse.Namespace, base: Any, tag: str) -> dict[str, Any]:
    argv = ["--tenants", str(tenants), "--rate", str(args.rate), "--duration", str(args.duration)]
    argv += ["--producers", str(args.producers), "--spans-per-message", str(args.spans_per_message)]
    argv += ["--rules-per-tenant", str(args.rules_per_tenant), "--out", str(args.out / tag), "--no-plot"]
    largs = loadtest.parse_args(argv)
    test = loadtest.LoadTest(largs, base, None)
    print(f"--- {tag}: {tenants} tenant(s), run {test.run_id}")
    result = test.run()
    loadtest.report.write_json(args.out / tag / "result.json", result)
    if result["ok"]:
        shutil.rmtree(test.data_root, ignore_errors=True)
    last = result["samples"][-1]["workers"]["w0"] if result["samples"] else {}
    load = [s for s in result["samples"] if 0 < s["t"] <= result["config"]["duration_s"]]
    peak_files = max((s["workers"]["w0"].get("duckdb_files") or 0 for s in load), default=0)
    peak_threads = max((s["workers"]["w0"].get("threads") or 0 for s in load), default=0)
    return {
        "tenants": tenants,
        "ok": result["ok"],
        "failures": result["failures"],
        "rss_steady_mib": round(steady_rss(result), 1),
        "rss_peak_mib": result["memory"]["w0"]["rss_peak_mib"],
        "open_duckdb_files": peak_files,
        "threads": peak_threads,
        "threads_at_end": last.get("threads"),
        "tenant_files_written": result["exactly_once"]["tenant_files"],
        "produced_spans": result["exactly_once"]["produced_spans"],
        "worker_cpu_mean_pct": result["memory"]["w0"]["cpu_mean_pct"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tenants", type=int, default=500)
    p.add_argument("--rules-per-tenant", type=int, default=20)
    p.add_argument("--rate", type=float, default=5000)
    p.add_argument("--duration", type=float, default=30)
    p.add_argument("--producers", type=int, default=2)
    p.add_argument("--spans-per-message", type=int, default=50)
    p.add_argument("--brokers", default=None)
    p.add_argument("--store-only", action="store_true", help="only the in-process DuckDB figures")
    p.add_argument(
        "--out", type=Path, default=ROOT / ".dev" / "bench-tenants" / time.strftime("%Y%m%d-%H%M%S")
    )
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    result["store"] = store_cost(args.tenants)
    print(f"DuckDB store, {args.tenants} tenant files open in one process: {json.dumps(result['store'])}")
    if not args.store_only:
        base = load_settings()
        if args.brokers:
            base = base.model_copy(update={"brokers": args.brokers})
        else:
            from betrace.dev.kafka import LocalKafka  # noqa: PLC0415

            kafka = LocalKafka(ROOT)
            kafka.up()
            base = base.model_copy(update={"brokers": kafka.bootstrap_servers})
        one = run_phase(1, args, base, "baseline-1-tenant")
        many = run_phase(args.tenants, args, base, f"{args.tenants}-tenants")
        per = (many["rss_steady_mib"] - one["rss_steady_mib"]) / max(1, args.tenants - 1)
        result.update(
            {
                "rate": args.rate,
                "duration_s": args.duration,
                "rules_per_tenant": args.rules_per_tenant,
                "baseline": one,
                "many": many,
                "rss_per_tenant_mib": round(per, 3),
                "target_mib": 50,
                "met": per < 50,
                "commit": loadtest.git_commit(),
            }
        )
        print(
            f"worker RSS after warm-up: {one['rss_steady_mib']} MiB with 1 tenant, "
            f"{many['rss_steady_mib']} MiB with {args.tenants} -> {per:.2f} MiB per tenant (target < 50 MB); "
            f"open DuckDB files {one['open_duckdb_files']} -> {many['open_duckdb_files']}, "
            f"threads {one['threads']} -> {many['threads']}"
        )
    (args.out / "result.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"result: {args.out / 'result.json'}")
    ok = result.get("baseline", {}).get("ok", True) and result.get("many", {}).get("ok", True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
