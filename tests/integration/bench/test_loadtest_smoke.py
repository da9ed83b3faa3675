"""The load-test harness in its short CI mode: real broker, real worker and producer processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("BETRACE_")}


def test_smoke_run_completes_exactly_once_with_json_and_plot(kafka_brokers: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "betrace", "bench", "--smoke", "--brokers", kafka_brokers),
            *("--out", str(out), "--root-close-delay", "0.1"),
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "load test passed" in proc.stdout
    result = json.loads((out / "result.json").read_text())
    assert result["ok"] and result["failures"] == []
    eo = result["exactly_once"]
    assert eo["ok"]
    assert eo["produced_spans"] > 0
    assert eo["stored_span_rows"] == eo["stored_distinct_spans"] == eo["produced_spans"]
    assert eo["expected_signals"] > 0
    assert eo["signal_records"] == eo["stored_signals"] == eo["ledger_transfers"] == eo["expected_signals"]
    assert eo["missing_signals"] == eo["unexpected_signals"] == eo["duplicate_signal_records"] == 0
    assert result["config"]["tenants"] == 10 and result["config"]["rules_per_tenant"] == 20
    # Whole traces with their roots: closed 0.1 s after their last span, not at the idle timeout.
    assert result["config"]["root_close_delay_s"] == 0.1
    closed_by = result["traces_closed_by"]
    assert closed_by["root"] > 0 and closed_by["root"] >= 10 * closed_by["idle"], closed_by
    assert eo["tenant_files"] == 10  # traffic reached every tenant's store
    # One sample per second over the load, each with the worker's RSS read from /proc.
    samples = result["samples"]
    assert len(samples) >= result["config"]["duration_s"]
    assert samples[-1]["produced"] == eo["produced_spans"]
    assert all(s["workers"]["w0"]["rss"] > 10 * 2**20 for s in samples)
    assert max(s["lag_total"] or 0 for s in samples) >= 0
    assert result["latency_ms"]["signals"] == eo["expected_signals"]
    lat = result["latency_ms"]
    assert lat["p50"] is not None and lat["p50"] > 0
    # Split at each signal's candidate record: both parts measured, neither longer than the whole.
    assert lat["to_candidate_p50"] > 0 and lat["sink_p50"] >= 0
    assert lat["to_candidate_p50"] <= lat["max"] and lat["sink_p50"] <= lat["max"]
    assert result["evaluate_ms"]["batches"] > 0
    assert result["producers"]["achieved_rate"] > 0
    assert result["memory"]["w0"]["rss_end_mib"] > 0
    png = out / "loadtest.png"
    assert result["plot"] == str(png)
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 20_000
    rules = sorted((out / "rules").glob("*.yaml"))
    assert len(rules) == 10


def test_bench_outside_a_checkout_fails_clearly(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "betrace", "bench", "--smoke"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert "error:" in proc.stderr and "benchmarks/loadtest.py not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bench_rejects_an_unsupported_worker_count(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "betrace", "bench", "--workers", "3"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "1, 2 or 4" in proc.stderr and "Traceback" not in proc.stderr
