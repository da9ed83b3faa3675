"""Circuit breakers around every external dependency (ledger, DuckDB, Redis, S3, rules).

pybreaker's state machine (closed → open → half-open → closed) stays the
source of truth; what this module changes is *when* a closed breaker opens.
pybreaker trips after N *consecutive* failures, which a flapping dependency
that fails every other call never reaches. The design asks for "50 % of calls
failing opens the breaker, reset after 30 s", so a :class:`_RatioPolicy`
listener keeps a rolling time window of outcomes and opens the pybreaker
breaker itself once at least ``min_calls`` calls were seen in the window and
the failed share reaches ``failure_ratio``. pybreaker's own counter is set so
high it never trips on its own.

Usage::

    registry = BreakerRegistry.from_settings(settings, audit=recorder)
    ledger = registry.get("ledger")
    ledger.call(client.create_transfers, batch)          # sync
    await ledger.call_async(client.create_async, batch)  # async
    # raises CircuitOpenError (retriable) while the breaker is open

Only errors that say something about the dependency's health count as
failures: cancellation and non-retriable :class:`BetraceError` (bad input,
bad rule) pass through without touching the window.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar

import pybreaker

from betrace.audit.events import AuditEventType, AuditRecorder, NullAuditRecorder
from betrace.errors import BetraceError, CircuitOpenError

if TYPE_CHECKING:
    from betrace.config import Settings
    from betrace.metrics import StageHooks

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

BreakerState = Literal["closed", "open", "half_open"]

#: The value of the ``betrace_breaker_state`` gauge per state.
STATE_GAUGE: dict[str, int] = {"closed": 0, "half_open": 1, "open": 2}

#: Well-known breaker names (the ``breaker`` metric label / step_id).
LEDGER = "ledger"
DUCKDB = "duckdb"
REDIS = "redis"
COLD_STORAGE = "cold_storage"
RULES = "rules"

#: pybreaker's consecutive-failure trip is disabled; the ratio policy decides.
_NEVER = 2**62

StateListener = Callable[["Breaker", str, str], None]
"""Called as ``listener(breaker, old_state, new_state)`` with normalised state names."""


def _norm(state: str) -> BreakerState:
    if state == pybreaker.STATE_HALF_OPEN:
        return "half_open"
    if state == pybreaker.STATE_OPEN:
        return "open"
    return "closed"


def counts_as_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says the dependency is unhealthy (pybreaker's ``is_system_error``)."""
    if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt | SystemExit | GeneratorExit):
        return False
    if isinstance(exc, CircuitOpenError):
        return False
    return not (isinstance(exc, BetraceError) and not exc.retriable)


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """When a closed breaker opens, and how long it stays open."""

    failure_ratio: float = 0.5
    window_seconds: float = 30.0
    min_calls: int = 5
    reset_timeout_seconds: float = 30.0

    @staticmethod
    def from_settings(settings: Settings) -> BreakerPolicy:
        r = settings.resilience
        return BreakerPolicy(
            failure_ratio=r.breaker_failure_ratio,
            window_seconds=r.breaker_window_seconds,
            min_calls=r.breaker_min_calls,
            reset_timeout_seconds=r.breaker_reset_timeout_seconds,
        )


class _RatioPolicy(pybreaker.CircuitBreakerListener):
    """Rolling window of call outcomes; opens the breaker on the failure ratio."""

    def __init__(self, policy: BreakerPolicy, clock: Callable[[], float]) -> None:
        self._policy = policy
        self._clock = clock
        self._outcomes: deque[tuple[float, bool]] = deque()
        self.last_error: str = ""
        #: (calls, failures) in the window when the ratio last opened the breaker.
        self.tripped_at: tuple[int, int] = (0, 0)

    def _trim(self, now: float) -> None:
        horizon = now - self._policy.window_seconds
        while self._outcomes and self._outcomes[0][0] < horizon:
            self._outcomes.popleft()

    def window(self) -> tuple[int, int]:
        """(calls, failures) currently in the window."""
        self._trim(self._clock())
        failures = sum(1 for _, ok in self._outcomes if not ok)
        return len(self._outcomes), failures

    def success(self, cb: pybreaker.CircuitBreaker) -> None:
        now = self._clock()
        self._outcomes.append((now, True))
        self._trim(now)

    def failure(self, cb: pybreaker.CircuitBreaker, exc: BaseException) -> None:
        now = self._clock()
        self._outcomes.append((now, False))
        self._trim(now)
        self.last_error = f"{type(exc).__name__}: {exc}"[:300]
        if cb.current_state != pybreaker.STATE_CLOSED:
            return
        calls = len(self._outcomes)
        failures = sum(1 for _, ok in self._outcomes if not ok)
        if calls >= self._policy.min_calls and failures / calls >= self._policy.failure_ratio:
            self.tripped_at = (calls, failures)
            cb.open()

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        # A fresh window after every transition: the failures that opened the
        # breaker must not re-open it right after a successful trial call.
        if new_state.name in (pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN):
            self._outcomes.clear()


class _Notifier(pybreaker.CircuitBreakerListener):
    def __init__(self, owner: Breaker) -> None:
        self._owner = owner

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        old = _norm(old_state.name) if old_state is not None else "closed"
        self._owner._notify(old, _norm(new_state.name))


class Breaker:
    """One named circuit breaker; ``name`` is the step_id in metric labels."""

    def __init__(
        self,
        name: str,
        policy: BreakerPolicy | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.policy = policy or BreakerPolicy()
        self._listeners: list[StateListener] = []
        self._listeners_lock = threading.Lock()
        self._ratio = _RatioPolicy(self.policy, clock)
        self._cb = pybreaker.CircuitBreaker(
            fail_max=_NEVER,
            reset_timeout=self.policy.reset_timeout_seconds,
            exclude=[lambda exc: not counts_as_failure(exc)],
            listeners=[self._ratio, _Notifier(self)],
            name=name,
            # Callers see the real error on the call that trips the breaker
            # (it is what gets logged and spooled); later calls get CircuitOpenError.
            throw_new_error_on_trip=False,
        )
        self._trial_in_flight = False

    # -- state -------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        """The pybreaker state; an open breaker whose reset timeout passed still reads "open"."""
        return _norm(self._cb.current_state)

    @property
    def last_error(self) -> str:
        """The most recent failure counted by this breaker, for readiness reasons."""
        return self._ratio.last_error

    def window(self) -> tuple[int, int]:
        """(calls, failures) in the current rolling window."""
        with self._cb._lock:
            return self._ratio.window()

    def retry_after(self) -> float:
        """Seconds until an open breaker lets a trial call through (0 when not open)."""
        if self.state != "open":
            return 0.0
        opened = self._cb._state_storage.opened_at
        if opened is None:
            return 0.0
        left = opened + timedelta(seconds=self.policy.reset_timeout_seconds) - datetime.now(UTC)
        return max(0.0, left.total_seconds())

    def allows_call(self) -> bool:
        """True unless the breaker is open and its reset timeout has not passed."""
        return self.state != "open" or self.retry_after() <= 0

    def open(self) -> None:
        """Force the breaker open (an operator action, or a failed health probe)."""
        self._cb.open()

    def close(self) -> None:
        """Force the breaker closed."""
        self._cb.close()

    def add_listener(self, listener: StateListener) -> None:
        with self._listeners_lock:
            self._listeners.append(listener)

    def _notify(self, old: str, new: str) -> None:
        if old == new:
            return
        logger.warning("breaker %s: %s -> %s (%s)", self.name, old, new, self.last_error or "-")
        with self._listeners_lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(self, old, new)
            except Exception:
                # A metrics/audit problem must never break the guarded call path.
                logger.exception("breaker %s: state listener failed", self.name)

    def _open_error(self) -> CircuitOpenError:
        msg = (
            f"circuit breaker {self.name!r} is open (last error: {self.last_error or 'n/a'}); "
            f"retry in {self.retry_after():.1f}s"
        )
        return CircuitOpenError(msg, breaker=self.name)

    # -- guarded calls -------------------------------------------------------

    def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn`` under the breaker; raises :class:`CircuitOpenError` when open."""
        try:
            return self._cb.call(fn, *args, **kwargs)
        except pybreaker.CircuitBreakerError as exc:
            raise self._open_error() from exc

    async def call_async(self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        """Await ``fn(*args, **kwargs)`` under the breaker.

        pybreaker's own ``call_async`` needs tornado; this drives the same
        state objects around an ``await``. In half-open only one trial call
        is in flight at a time; concurrent callers get :class:`CircuitOpenError`.
        """
        cb = self._cb
        with cb._lock:
            current = cb.state
            if current.name == pybreaker.STATE_OPEN:
                if not self.allows_call():
                    raise self._open_error()
                cb.half_open()
                current = cb.state
            trial = current.name == pybreaker.STATE_HALF_OPEN
            if trial:
                if self._trial_in_flight:
                    raise self._open_error()
                self._trial_in_flight = True
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            with cb._lock:
                self._trial_in_flight = False if trial else self._trial_in_flight
                # Half-open's on_failure re-raises ``exc`` after re-opening; it is raised below.
                with contextlib.suppress(BaseException):
                    cb.state._handle_error(exc, reraise=False)
            raise
        with cb._lock:
            if trial:
                self._trial_in_flight = False
            cb.state._handle_success()
        return result

    def snapshot(self) -> dict[str, Any]:
        calls, failures = self.window()
        return {
            "name": self.name,
            "state": self.state,
            "calls_in_window": calls,
            "failures_in_window": failures,
            "retry_after_seconds": round(self.retry_after(), 3),
            "last_error": self.last_error,
        }


class BreakerRegistry:
    """One breaker per dependency name, shared by everything in a process.

    Registry-level listeners apply to every breaker, including ones created
    later; the registry itself reports the ``betrace_breaker_state`` gauge and
    ``betrace_breaker_transitions_total`` through ``hooks`` and records a
    ``breaker.state_changed`` audit event for each transition.
    """

    def __init__(
        self,
        policy: BreakerPolicy | None = None,
        *,
        audit: AuditRecorder | None = None,
        hooks: StageHooks | None = None,
        clock: Callable[[], float] = time.monotonic,
        actor: str = "worker",
    ) -> None:
        self.policy = policy or BreakerPolicy()
        self._audit: AuditRecorder = audit or NullAuditRecorder()
        self._hooks = hooks
        self._clock = clock
        self._actor = actor
        self._breakers: dict[str, Breaker] = {}
        self._listeners: list[StateListener] = []
        self._lock = threading.Lock()

    @staticmethod
    def from_settings(
        settings: Settings,
        *,
        audit: AuditRecorder | None = None,
        hooks: StageHooks | None = None,
        actor: str = "worker",
    ) -> BreakerRegistry:
        return BreakerRegistry(BreakerPolicy.from_settings(settings), audit=audit, hooks=hooks, actor=actor)

    def set_hooks(self, hooks: StageHooks) -> None:
        """Install metric hooks (the worker builds them after the registry)."""
        self._hooks = hooks
        for breaker in self.all():
            hooks.gauge("betrace_breaker_state", STATE_GAUGE[breaker.state], breaker=breaker.name)

    def set_audit(self, audit: AuditRecorder) -> None:
        self._audit = audit

    def add_listener(self, listener: StateListener) -> None:
        with self._lock:
            self._listeners.append(listener)
            existing = list(self._breakers.values())
        for breaker in existing:
            breaker.add_listener(listener)

    def get(self, name: str) -> Breaker:
        """The breaker for ``name``, created closed on first use."""
        with self._lock:
            breaker = self._breakers.get(name)
            if breaker is not None:
                return breaker
            breaker = Breaker(name, self.policy, clock=self._clock)
            breaker.add_listener(self._report)
            for listener in self._listeners:
                breaker.add_listener(listener)
            self._breakers[name] = breaker
        if self._hooks is not None:
            self._hooks.gauge("betrace_breaker_state", 0, breaker=name)
        return breaker

    def all(self) -> list[Breaker]:
        with self._lock:
            return list(self._breakers.values())

    def open_breakers(self) -> list[Breaker]:
        return [b for b in self.all() if b.state == "open"]

    def snapshot(self) -> list[dict[str, Any]]:
        return [b.snapshot() for b in sorted(self.all(), key=lambda b: b.name)]

    def _report(self, breaker: Breaker, old: str, new: str) -> None:
        hooks = self._hooks
        if hooks is not None:
            hooks.gauge("betrace_breaker_state", STATE_GAUGE[new], breaker=breaker.name)
            hooks.count("betrace_breaker_transitions_total", breaker=breaker.name, to=new)
        calls, failures = breaker._ratio.tripped_at if new == "open" else breaker.window()
        self._audit.record(
            AuditEventType.BREAKER_STATE_CHANGED,
            actor=self._actor,
            subject=breaker.name,
            outcome=new,
            payload={
                "from": old,
                "to": new,
                "last_error": breaker.last_error,
                "failure_ratio": breaker.policy.failure_ratio,
                "calls_in_window": calls,
                "failures_in_window": failures,
                "reset_timeout_seconds": breaker.policy.reset_timeout_seconds,
            },
        )
