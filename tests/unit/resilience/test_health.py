"""Readiness checks for breakers, spools, backpressure and TCP dependencies."""

from __future__ import annotations

import socket
from pathlib import Path

import faust

from betrace.config import load_settings
from betrace.observability.health import (
    CheckResult,
    HealthChecks,
    backpressure_check,
    breaker_check,
    recovery_check,
    resilience_checks,
    spool_check,
    tcp_check,
)
from betrace.resilience.backpressure import Backpressure
from betrace.resilience.breakers import BreakerRegistry
from betrace.resilience.wiring import Resilience


def test_write_path_breaker_open_is_not_ready_redis_only_degraded() -> None:
    registry = BreakerRegistry()
    check = breaker_check(registry)
    assert check().ok and check().detail == "no breaker used yet"
    registry.get("duckdb")
    registry.get("redis").open()
    result = check()
    assert result.ok and "degraded: redis open" in result.detail and "duckdb closed" in result.detail
    registry.get("ledger").open()
    result = check()
    assert not result.ok and result.detail.startswith("ledger open (retry in")


def test_spool_depth_threshold() -> None:
    depth = {"spans": 10, "signals": 0}
    check = spool_check(lambda: depth, max_items=100)
    assert check().ok
    depth["spans"] = 101
    result = check()
    assert not result.ok and result.detail == "spool spans holds 101 items (threshold 100)"


def test_backpressure_saturation_fails_readiness_with_the_reason() -> None:
    fill = [0.95]
    bp = Backpressure()
    bp.register("spool.spans", lambda: fill[0])
    assert not backpressure_check(bp)().ok
    fill[0] = 0.2
    assert backpressure_check(bp)().ok


def test_tcp_check_against_a_real_listener() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert tcp_check("TigerBeetle", f"127.0.0.1:{port}")().ok
    result = tcp_check("TigerBeetle", f"127.0.0.1:{port}", timeout_s=0.2)()
    assert not result.ok and "TigerBeetle unreachable" in result.detail


def test_resilience_checks_in_a_health_report(tmp_path: Path) -> None:
    cfg = load_settings(data_dir=tmp_path / "data", tigerbeetle_addresses="127.0.0.1:1")
    res = Resilience.build(cfg)
    health = HealthChecks()
    for name, check in resilience_checks(res, cfg).items():
        health.add(name, check)
    ok, report = health.ready()
    assert not ok
    assert set(report) == {"breakers", "spools", "backpressure", "ledger"}
    assert not report["ledger"]["ok"] and report["breakers"]["ok"]


def test_not_ready_until_faust_has_restored_the_tables() -> None:
    """A worker restoring open traces reads zero lag, yet judges nothing: not ready."""
    app = faust.App("betrace-health-test", broker="kafka://127.0.0.1:1", autodiscover=False)
    check = recovery_check(app)
    result = check()
    assert not result.ok and result.detail == "assembly state not restored yet"
    recovery = app.tables.recovery
    recovery.in_recovery = True
    result = check()
    assert not result.ok and result.detail.startswith("restoring assembly state (")
    recovery.in_recovery = False
    recovery.completed.set()
    assert check() == CheckResult(True, "state restored")
    app.rebalancing = True
    assert check() == CheckResult(False, "rebalancing")
