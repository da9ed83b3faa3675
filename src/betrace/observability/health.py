"""Liveness and readiness: named checks, each with a reason when it fails.

Components register their own checks (the lag monitor, the broker
connection, the data directory, and later breakers and spools), so readiness
grows with the pipeline instead of being hard-coded here.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from betrace.observability.lag_monitor import LagMonitor

if TYPE_CHECKING:
    from betrace.config import Settings
    from betrace.resilience.backpressure import Backpressure
    from betrace.resilience.breakers import Breaker, BreakerRegistry
    from betrace.resilience.wiring import Resilience

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CheckResult:
    ok: bool
    detail: str


Check = Callable[[], CheckResult]


class HealthChecks:
    """Readiness is the conjunction of every registered check."""

    def __init__(self) -> None:
        self._checks: dict[str, Check] = {}
        self.started_at = time.time()

    def add(self, name: str, check: Check) -> None:
        self._checks[name] = check

    def ready(self) -> tuple[bool, dict[str, Any]]:
        results: dict[str, Any] = {}
        for name, check in self._checks.items():
            try:
                result = check()
            except Exception as exc:  # noqa: BLE001 - a broken check must read as not ready, not crash
                result = CheckResult(False, f"check raised {type(exc).__name__}: {exc}")
            results[name] = {"ok": result.ok, "detail": result.detail}
        return all(r["ok"] for r in results.values()), results

    def live(self) -> dict[str, Any]:
        return {"status": "alive", "pid": os.getpid(), "uptime_s": round(time.time() - self.started_at, 1)}


def data_dir_check(data_dir: Path) -> Check:
    def check() -> CheckResult:
        # The store creates missing directories, so the nearest existing ancestor decides.
        target = data_dir
        while not target.exists() and target != target.parent:
            target = target.parent
        if not target.is_dir() or not os.access(target, os.W_OK | os.X_OK):
            return CheckResult(False, f"{data_dir} is not writable ({target} refuses writes)")
        return CheckResult(True, f"{data_dir} is writable")

    return check


def lag_checks(monitor: LagMonitor) -> dict[str, Check]:
    """Broker reachability (a recent successful lag read) and the lag threshold."""

    def broker() -> CheckResult:
        snap = monitor.snapshot
        if snap.taken_at == 0:
            return CheckResult(False, "no broker round-trip yet")
        if snap.error:
            return CheckResult(False, f"last broker round-trip failed: {snap.error}")
        age = time.time() - snap.taken_at
        if age > 3 * monitor.interval_s + 5:
            return CheckResult(False, f"no broker round-trip for {age:.0f}s")
        return CheckResult(True, f"broker answered {age:.1f}s ago")

    def lag() -> CheckResult:
        total = monitor.snapshot.total(monitor.group)
        if total > monitor.threshold:
            return CheckResult(
                False, f"group {monitor.group} lags {total} records (threshold {monitor.threshold})"
            )
        return CheckResult(True, f"group {monitor.group} lags {total} records")

    return {"broker": broker, "consumer_lag": lag}


def assignment_check(app: Any) -> Check:
    """The worker owns partitions: otherwise it consumes nothing."""

    def check() -> CheckResult:
        try:
            assigned = app.consumer.assignment()
        except Exception as exc:  # noqa: BLE001 - faust raises various errors before start
            return CheckResult(False, f"consumer not started: {exc}")
        if not assigned:
            return CheckResult(False, "no partitions assigned (rebalancing, or more workers than partitions)")
        return CheckResult(True, f"{len(assigned)} partitions assigned")

    return check


def recovery_check(app: Any) -> Check:
    """Not ready while faust rebalances or restores tables: the state it restores (open
    traces, decisions) is not being judged yet, even though the consumer lag reads zero."""

    def check() -> CheckResult:
        if getattr(app, "rebalancing", False):
            return CheckResult(False, "rebalancing")
        recovery = app.tables.recovery
        if recovery.in_recovery:
            remaining = recovery.active_remaining_total()
            return CheckResult(False, f"restoring assembly state ({remaining} changelog records left)")
        if not recovery.completed.is_set():
            return CheckResult(False, "assembly state not restored yet")
        return CheckResult(True, "state restored")

    return check


#: Breakers on the write path: open means writes are being spooled or held.
CRITICAL_BREAKERS = frozenset({"ledger", "duckdb", "rules"})


def breaker_check(registry: BreakerRegistry, critical: frozenset[str] = CRITICAL_BREAKERS) -> Check:
    """Not ready while a write-path breaker is open; the reason names it and its last error.

    Breakers with a fallback (``redis`` falls back to in-process caches,
    ``cold_storage`` retries archival later) are reported as degraded, not
    as failing readiness.
    """

    def describe(b: Breaker) -> str:
        return f"{b.name} open (retry in {b.retry_after():.0f}s, last error: {b.last_error or 'n/a'})"

    def check() -> CheckResult:
        breakers = sorted(registry.all(), key=lambda b: b.name)
        failing = [describe(b) for b in breakers if b.state == "open" and b.name in critical]
        if failing:
            return CheckResult(False, "; ".join(failing))
        if not breakers:
            return CheckResult(True, "no breaker used yet")
        degraded = [f"degraded: {describe(b)}" for b in breakers if b.state == "open"]
        states = ", ".join(f"{b.name} {b.state}" for b in breakers if b.state != "open")
        return CheckResult(True, "; ".join([*degraded, states] if states else degraded))

    return check


def spool_check(pending: Callable[[], dict[str, int]], max_items: int) -> Check:
    """Not ready while a spool holds more than ``max_items`` writes waiting for replay."""

    def check() -> CheckResult:
        depth = pending()
        over = {name: n for name, n in depth.items() if n > max_items}
        if over:
            return CheckResult(
                False,
                ", ".join(
                    f"spool {n} holds {c} items (threshold {max_items})" for n, c in sorted(over.items())
                ),
            )
        if not depth:
            return CheckResult(True, "no spools")
        return CheckResult(True, ", ".join(f"spool {n}: {c} items" for n, c in sorted(depth.items())))

    return check


def backpressure_check(backpressure: Backpressure) -> Check:
    """Not ready while a bounded buffer or spool is saturated (partitions are paused)."""

    def check() -> CheckResult:
        reasons = backpressure.reasons()
        if reasons:
            return CheckResult(False, "; ".join(reasons))
        return CheckResult(True, f"fullest buffer at {backpressure.level():.0%}")

    return check


def tcp_check(name: str, addresses: str, *, timeout_s: float = 0.5) -> Check:
    """Reachability of a TCP dependency (TigerBeetle replicas): any address accepting a connect.

    ``addresses`` is TigerBeetle's format: comma-separated ``host:port`` or bare ports.
    """
    targets: list[tuple[str, int]] = []
    for part in (p.strip() for p in addresses.split(",")):
        if not part:
            continue
        host, _, port = part.rpartition(":")
        targets.append((host or "127.0.0.1", int(port)))

    def check() -> CheckResult:
        errors = []
        for host, port in targets:
            try:
                with socket.create_connection((host, port), timeout=timeout_s):
                    return CheckResult(True, f"{name} reachable at {host}:{port}")
            except OSError as exc:
                errors.append(f"{host}:{port}: {exc}")
        return CheckResult(False, f"{name} unreachable ({'; '.join(errors) or 'no address'})")

    return check


def resilience_checks(resilience: Resilience, settings: Settings) -> dict[str, Check]:
    """Breakers, spool depth, backpressure, and the ledger's reachability when it is TigerBeetle."""
    checks = {
        "breakers": breaker_check(resilience.breakers),
        "spools": spool_check(resilience.pending_items, settings.resilience.spool_ready_max_items),
        "backpressure": backpressure_check(resilience.backpressure),
    }
    if settings.tigerbeetle_addresses:
        checks["ledger"] = tcp_check("TigerBeetle", settings.tigerbeetle_addresses)
    return checks
