"""Turn a finished load-test run into figures, checks and a printed report."""

from __future__ import annotations

import time
from collections import Counter
from statistics import mean
from typing import Any

from harness import probes, report
from harness.producers import ProducerResult
from harness.verify import check_stores

MB = 1024 * 1024


def _near(samples: list[dict[str, Any]], t: float) -> dict[str, Any]:
    return min(samples, key=lambda s: abs(s["t"] - t))


def _memory(test: Any, load: list[dict[str, Any]], warm_t: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not load:
        return out
    first, last = _near(load, warm_t), load[-1]
    for name in test.workers:
        series = [s["workers"][name]["rss"] for s in load if s["workers"].get(name, {}).get("rss")]
        cpus = [
            s["workers"][name]["cpu_pct"]
            for s in load
            if s["workers"].get(name, {}).get("cpu_pct") is not None
        ]
        at_warm = first["workers"].get(name, {}).get("rss")
        at_end = last["workers"].get(name, {}).get("rss")
        growth = 100.0 * (at_end - at_warm) / at_warm if at_warm and at_end else None
        out[name] = {
            "rss_after_warmup_mib": round(at_warm / MB, 1) if at_warm else None,
            "rss_end_mib": round(at_end / MB, 1) if at_end else None,
            "rss_peak_mib": round(max(series) / MB, 1) if series else None,
            "rss_growth_pct": round(growth, 2) if growth is not None else None,
            "cpu_mean_pct": round(mean(cpus), 1) if cpus else None,
        }
    return out


def summarise(test: Any, results: list[ProducerResult]) -> dict[str, Any]:
    args = test.args
    samples: list[dict[str, Any]] = test.samples
    warm_t = args.duration * args.warmup_pct / 100
    load = [s for s in samples if 0 < s["t"] <= args.duration + 0.5]
    steady = [s for s in load if s["t"] > warm_t]
    failures: list[str] = test.failures
    warnings: list[str] = test.warnings

    # Producers: are they keeping up with the target?
    produced = sum(r.spans for r in results)
    first = min((r.first_send for r in results if r.first_send), default=0.0)
    last = max((r.last_ack for r in results), default=0.0)
    achieved = produced / (last - first) if last > first else 0.0
    ratio = achieved / args.rate if args.rate else 0.0
    prod_cpu = [round(100 * r.cpu_s / max(last - first, 1e-6), 1) for r in results]
    producers = {
        "target_rate": args.rate,
        "achieved_rate": round(achieved),
        "achieved_ratio": round(ratio, 3),
        "cpu_pct_each": prod_cpu,
        "pool_spans_each": [r.pool_spans for r in results],
        "encode_s_each": [r.encode_s for r in results],
        "cycles_each": [r.cycles for r in results],
        "tokens_dropped_spans": round(sum(r.tokens_dropped for r in results)),
    }
    if ratio < args.min_produce_ratio:
        msg = (
            f"producers fell short: {achieved:,.0f} of {args.rate:,.0f} spans/s ({ratio:.0%}); each used "
            f"{prod_cpu}% of a core. Below ~90% CPU the broker or the machine is the limit, "
            "else add --producers"
        )
        (warnings if args.smoke else failures).append(msg)

    # Exactly-once.
    expected = {k for r in results for k in r.truth}
    keys = [s["key"] for s in test.signals]
    detected = set(keys)
    dup_ids = sum(n - 1 for n in Counter(s["signal_id"] for s in test.signals).values() if n > 1)
    dirs = [test.data_root]
    store = check_stores([d for d in dirs if d.exists()])
    checks = {
        "produced_spans": produced,
        "stored_span_rows": store.span_rows,
        "stored_distinct_spans": store.distinct_spans,
        "expected_signals": len(expected),
        "signal_records": len(keys),
        "missing_signals": len(expected - detected),
        "unexpected_signals": len(detected - expected),
        "duplicate_signal_records": len(keys) - len(detected),
        "duplicate_signal_ids": dup_ids,
        "stored_signals": store.signal_rows,
        "stored_distinct_signals": store.distinct_signals,
        "stored_signals_not_emitted": store.signals_not_emitted,
        "ledger_transfers": store.ledger_transfers,
        "tenant_files": store.tenant_files,
    }
    ok = (
        store.span_rows == store.distinct_spans == produced
        and detected == expected
        and len(keys) == len(detected)
        and store.signal_rows == store.distinct_signals == len(expected)
        and store.signals_not_emitted == 0
        and store.ledger_transfers == len(expected)
    )
    checks["ok"] = ok
    if not ok:
        failures.append(f"exactly-once violated: {checks}")

    lat = sorted(s["latency_ms"] for s in test.signals)
    lat_steady = sorted(s["latency_ms"] for s in test.signals if warm_t < s["t"] <= args.duration)
    split = [
        (c - s["source_ms"], s["ts"] - c) for s in test.signals if (c := test.candidates.get(s["signal_id"]))
    ]
    to_candidate, in_sink = sorted(a for a, _ in split), sorted(b for _, b in split)
    hist = getattr(test, "eval_hist_total", {}) or {}
    batches = max(hist.values()) if hist else 0

    def q(values: list[float], p: float) -> float | None:
        v = probes.percentile(values, p)
        return round(v, 1) if v is not None else None

    def eval_q(p: float) -> float | None:
        v = probes.histogram_quantile(hist, p)
        return round(v * 1000, 1) if v is not None else None

    drained_at: float = getattr(test, "drained_at", 0.0)
    consumed_at_end = _near(load, args.duration)["consumed"] if load else 0
    broker = [s["broker_cpu_pct"] for s in steady if s.get("broker_cpu_pct") is not None]
    memory = _memory(test, load, warm_t)
    growths = [m["rss_growth_pct"] for m in memory.values() if m["rss_growth_pct"] is not None]
    result: dict[str, Any] = {
        "run_id": test.run_id,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "ok": not failures,
        "failures": failures,
        "warnings": warnings,
        "config": {
            "rate": args.rate,
            "duration_s": args.duration,
            "producers": args.producers,
            "workers": args.workers,
            "split_ingest": args.split_ingest,
            "ingest_workers": args.ingest_workers if args.split_ingest else 0,
            "partitions": args.partitions,
            "tenants": args.tenants,
            "rules_per_tenant": args.rules_per_tenant,
            "spans_per_message": args.spans_per_message,
            "violation_rate": args.violation_rate,
            "idle_timeout_s": args.idle_timeout,
            "root_close_delay_s": args.root_close_delay,
            "warmup_pct": args.warmup_pct,
            "smoke": args.smoke,
        },
        "producers": producers,
        "throughput": {
            "produced_spans": produced,
            "consumed_during_load_spans_per_s": round(consumed_at_end / args.duration),
            "steady_consume_spans_per_s": round(mean(s["consume_rate"] for s in steady)) if steady else None,
            "steady_store_spans_per_s": round(mean(s["store_rate"] for s in steady)) if steady else None,
            "drained_after_s": round(drained_at, 1),
            "end_to_end_spans_per_s": round(produced / drained_at) if drained_at else None,
            "max_lag_records": max((s["lag_total"] or 0 for s in samples), default=0),
            "broker_cpu_mean_pct": round(mean(broker), 1) if broker else None,
        },
        "latency_ms": {
            "signals": len(lat),
            "p50": q(lat, 0.5),
            "p90": q(lat, 0.9),
            "p99": q(lat, 0.99),
            "max": lat[-1] if lat else None,
            "steady_p50": q(lat_steady, 0.5),
            "steady_p99": q(lat_steady, 0.99),
            "includes_idle_timeout_s": args.idle_timeout,
            "includes_root_close_delay_s": args.root_close_delay,
            # The same signals split at their candidate record: ingest + assembly + evaluate, then the sink.
            "to_candidate_p50": q(to_candidate, 0.5),
            "to_candidate_p99": q(to_candidate, 0.99),
            "sink_p50": q(in_sink, 0.5),
            "sink_p99": q(in_sink, 0.99),
        },
        "evaluate_ms": {
            "batches": int(batches),
            "p50": eval_q(0.5),
            "p99": eval_q(0.99),
            "method": "bucket-interpolated from the workers' betrace_evaluate_seconds",
        },
        "traces_closed_by": getattr(test, "closed_by", {}),
        "memory": memory,
        "rss_growth_after_warmup_max_pct": max(growths) if growths else None,
        "exactly_once": checks,
        "worker_names": list(test.workers),
        "samples": samples,
    }
    print_report(result)
    return result


def print_report(result: dict[str, Any]) -> None:
    cfg, prod, thr = result["config"], result["producers"], result["throughput"]
    lat, ev, eo = result["latency_ms"], result["evaluate_ms"], result["exactly_once"]
    print()
    print(report.compact_table(result["samples"], result["worker_names"]))
    print()
    ingest = f" + {cfg['ingest_workers']} ingest" if cfg["split_ingest"] else ""
    print(
        f"load: {cfg['rate']:,.0f} spans/s target for {cfg['duration_s']:g}s, {cfg['producers']} producers; "
        f"{cfg['workers']} worker(s){ingest}, "
        f"{cfg['partitions']} partitions, {cfg['tenants']} tenants x {cfg['rules_per_tenant']} rules"
    )
    print(
        f"producers: achieved {prod['achieved_rate']:,} spans/s ({prod['achieved_ratio']:.0%} of target), "
        f"CPU {prod['cpu_pct_each']}% each"
    )
    print(
        f"throughput: consumed {thr['consumed_during_load_spans_per_s']:,} spans/s during the load "
        f"(steady {thr['steady_consume_spans_per_s']}), stored steady {thr['steady_store_spans_per_s']}; "
        f"all {thr['produced_spans']:,} spans done after {thr['drained_after_s']}s "
        f"= {thr['end_to_end_spans_per_s']} spans/s end to end; max lag {thr['max_lag_records']:,} records; "
        f"broker CPU {thr['broker_cpu_mean_pct']}%"
    )
    floor = (
        f"the {lat['includes_root_close_delay_s']}s root close delay"
        if lat.get("includes_root_close_delay_s")
        else f"the {lat['includes_idle_timeout_s']}s idle timeout"
    )
    print(
        f"produce-to-signal latency ({lat['signals']:,} signals, includes {floor}): "
        f"p50 {lat['p50']} ms, p90 {lat['p90']} ms, "
        f"p99 {lat['p99']} ms, max {lat['max']} ms; "
        f"after warm-up p99 {lat['steady_p99']} ms"
    )
    print(
        f"  of which input -> candidate (ingest, assembly, evaluate) p50 {lat['to_candidate_p50']} ms, "
        f"p99 {lat['to_candidate_p99']} ms; candidate -> signal (signal sink) p50 {lat['sink_p50']} ms, "
        f"p99 {lat['sink_p99']} ms"
    )
    print(
        f"rule evaluation per batch ({ev['batches']:,} batches, from the workers' histogram): "
        f"p50 {ev['p50']} ms, p99 {ev['p99']} ms"
    )
    if result.get("traces_closed_by"):
        causes = ", ".join(f"{n:,} {c}" for c, n in result["traces_closed_by"].items())
        print(f"traces closed by cause (the workers' counters): {causes}")
    for name, m in result["memory"].items():
        print(
            f"{name}: RSS {m['rss_after_warmup_mib']} MiB after warm-up -> {m['rss_end_mib']} MiB at the end "
            f"({m['rss_growth_pct']}%), peak {m['rss_peak_mib']} MiB, CPU {m['cpu_mean_pct']}%"
        )
    print(
        f"exactly-once: spans produced {eo['produced_spans']:,}, stored {eo['stored_span_rows']:,} "
        f"({eo['stored_distinct_spans']:,} distinct); signals expected {eo['expected_signals']:,}, "
        f"on the topic {eo['signal_records']:,} (missing {eo['missing_signals']}, "
        f"unexpected {eo['unexpected_signals']}, "
        f"duplicates {eo['duplicate_signal_records']}), stored {eo['stored_signals']:,}, ledger "
        f"{eo['ledger_transfers']:,} -> {'OK' if eo['ok'] else 'VIOLATED'}"
    )
    for w in result["warnings"]:
        print(f"warning: {w}")
