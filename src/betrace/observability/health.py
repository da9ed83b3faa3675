"""Liveness and readiness: named checks, each with a reason when it fails.

Components register their own checks (the lag monitor, the broker
connection, the data directory, and later breakers and spools), so readiness
grows with the pipeline instead of being hard-coded here.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from betrace.observability.lag_monitor import LagMonitor

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
