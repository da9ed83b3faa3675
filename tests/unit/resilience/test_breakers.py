"""The failure-ratio breaker policy on top of pybreaker's state machine."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from betrace.audit.events import AuditEventType, EventRef
from betrace.config import load_settings
from betrace.errors import CircuitOpenError, RuleError, SinkError
from betrace.metrics import METRICS_BY_NAME, InMemoryHooks
from betrace.resilience import BreakerPolicy, BreakerRegistry


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[AuditEventType, dict[str, Any]]] = []

    def record(self, event_type: AuditEventType, **kw: Any) -> EventRef:
        self.events.append((event_type, kw))
        return EventRef.new()


def ok() -> str:
    return "ok"


def fail() -> str:
    msg = "disk refuses writes"
    raise OSError(msg)


def attempt(breaker: Any, fn: Any) -> str:
    try:
        return str(breaker.call(fn))
    except OSError:
        return "failed"
    except CircuitOpenError:
        return "refused"


def test_half_failures_over_min_calls_opens_and_reports() -> None:
    hooks, audit = InMemoryHooks(), Recorder()
    registry = BreakerRegistry(BreakerPolicy(0.5, 30, 4, 30), hooks=hooks, audit=audit, clock=Clock())
    b = registry.get("duckdb")
    # 1 failure in 3 calls: below min calls and below the ratio -> closed
    assert [attempt(b, f) for f in (ok, fail, ok)] == ["ok", "failed", "ok"]
    assert b.state == "closed"
    # 4th call fails: 2 of 4 = 50 % -> open; the tripping call sees the real error
    assert attempt(b, fail) == "failed"
    assert b.state == "open"
    assert attempt(b, ok) == "refused"
    with pytest.raises(CircuitOpenError) as info:
        b.call(ok)
    assert info.value.retriable and info.value.breaker == "duckdb"
    assert "disk refuses writes" in str(info.value)
    assert hooks.gauges[("betrace_breaker_state", (("breaker", "duckdb"),))] == 2
    assert hooks.total("betrace_breaker_transitions_total", breaker="duckdb", to="open") == 1
    ((event, kw),) = audit.events
    assert event is AuditEventType.BREAKER_STATE_CHANGED
    assert kw["subject"] == "duckdb" and kw["outcome"] == "open"
    assert kw["payload"]["from"] == "closed" and kw["payload"]["calls_in_window"] == 4
    assert {"betrace_breaker_state", "betrace_breaker_transitions_total"} <= METRICS_BY_NAME.keys()


def test_consecutive_failures_alone_do_not_open_below_min_calls() -> None:
    b = BreakerRegistry(BreakerPolicy(0.5, 30, 10, 30), clock=Clock()).get("ledger")
    for _ in range(9):
        attempt(b, fail)
    assert b.state == "closed"  # pybreaker's own consecutive counter never trips
    attempt(b, fail)
    assert b.state == "open"


def test_old_failures_leave_the_window() -> None:
    clock = Clock()
    b = BreakerRegistry(BreakerPolicy(0.5, 10, 4, 30), clock=clock).get("redis")
    for _ in range(3):
        attempt(b, fail)
    clock.now += 11  # those failures are now older than the window
    for f in (ok, ok, fail, ok):
        attempt(b, f)
    assert b.state == "closed"
    assert b.window() == (4, 1)


def test_reset_timeout_half_open_trial_then_close_or_reopen() -> None:
    events: list[tuple[str, str]] = []
    b = BreakerRegistry(BreakerPolicy(0.5, 30, 2, 0.2), clock=Clock()).get("cold_storage")
    b.add_listener(lambda br, old, new: events.append((old, new)))
    attempt(b, fail)
    attempt(b, fail)
    assert b.state == "open" and not b.allows_call()
    asyncio.run(asyncio.sleep(0.25))
    assert b.allows_call()
    assert attempt(b, fail) == "failed"  # the trial fails -> open again
    assert b.state == "open"
    asyncio.run(asyncio.sleep(0.25))
    assert attempt(b, ok) == "ok"
    assert b.state == "closed"
    assert events == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]
    # A fresh window after closing: only the successful trial is in it, not the old failures.
    assert b.window() == (1, 0)


def test_async_calls_share_the_state_machine() -> None:
    b = BreakerRegistry(BreakerPolicy(0.5, 30, 2, 0.2), clock=Clock()).get("ledger")

    async def aok() -> int:
        return 7

    async def afail() -> int:
        raise SinkError("ledger unreachable")

    async def scenario() -> list[str]:
        out = []
        for fn in (afail, afail, aok):
            try:
                out.append(str(await b.call_async(fn)))
            except SinkError:
                out.append("failed")
            except CircuitOpenError:
                out.append("refused")
        await asyncio.sleep(0.25)
        out.append(str(await b.call_async(aok)))
        return out

    assert asyncio.run(scenario()) == ["failed", "failed", "refused", "7"]
    assert b.state == "closed"


def test_only_one_async_trial_in_half_open() -> None:
    b = BreakerRegistry(BreakerPolicy(0.5, 30, 1, 0.05), clock=Clock()).get("duckdb")
    attempt(b, fail)
    gate = asyncio.Event

    async def scenario() -> list[str]:
        release = gate()

        async def slow() -> str:
            await release.wait()
            return "trial"

        await asyncio.sleep(0.1)
        trial = asyncio.ensure_future(b.call_async(slow))
        await asyncio.sleep(0)
        try:
            await b.call_async(slow)
            second = "ran"
        except CircuitOpenError:
            second = "refused"
        release.set()
        return [await trial, second]

    assert asyncio.run(scenario()) == ["trial", "refused"]
    assert b.state == "closed"


def test_bad_input_and_cancellation_are_not_dependency_failures() -> None:
    b = BreakerRegistry(BreakerPolicy(0.5, 30, 1, 30), clock=Clock()).get("rules")

    def bad_rule() -> None:
        raise RuleError("not a rule")  # non-retriable: the caller's fault

    with pytest.raises(RuleError):
        b.call(bad_rule)

    async def cancelled() -> None:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(b.call_async(cancelled))
    assert b.state == "closed"


def test_registry_from_settings_shares_breakers_and_listeners() -> None:
    cfg = load_settings(
        resilience={"breaker_failure_ratio": 0.25, "breaker_min_calls": 8, "breaker_reset_timeout_seconds": 3}
    )
    registry = BreakerRegistry.from_settings(cfg)
    seen: list[str] = []
    registry.add_listener(lambda br, old, new: seen.append(f"{br.name}:{new}"))
    a = registry.get("redis")
    assert registry.get("redis") is a
    assert a.policy == BreakerPolicy(0.25, 30.0, 8, 3.0)
    a.open()
    registry.get("ledger").open()
    assert seen == ["redis:open", "ledger:open"]
    assert [s["name"] for s in registry.snapshot()] == ["ledger", "redis"]
    assert {b.name for b in registry.open_breakers()} == {"ledger", "redis"}


def test_a_broken_listener_never_breaks_the_call() -> None:
    b = BreakerRegistry(BreakerPolicy(0.5, 30, 1, 30), clock=Clock()).get("duckdb")

    def boom(*_: Any) -> None:
        raise RuntimeError("listener bug")

    b.add_listener(boom)
    assert attempt(b, fail) == "failed"
    assert b.state == "open"
