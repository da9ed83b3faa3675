"""The circuit breaker named "redis" that guards every Redis call of the cache tier.

The worker-wide breakers live in :mod:`betrace.resilience.breakers` (a
``BreakerRegistry`` with ``get(name)``, ``call``/``call_async``, ``state`` and
:class:`~betrace.errors.CircuitOpenError`). :func:`redis_breaker` takes the
"redis" breaker from a registry when one is given; without one (tools,
tests, the benchmark) it makes a :class:`LocalBreaker` with the same
contract, so the cache code is the same either way.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from betrace.errors import CircuitOpenError

T = TypeVar("T")
NAME = "redis"

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half-open"


class Breaker(Protocol):
    """What the cache needs of a breaker (the resilience registry's breakers have it)."""

    @property
    def state(self) -> str: ...

    def call(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T: ...

    async def call_async(self, func: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T: ...


class BreakerSource(Protocol):
    def get(self, name: str) -> Any: ...


class LocalBreaker:
    """Opens after ``fail_max`` consecutive failures, lets one trial call through after ``reset_s``.

    While open, calls fail at once with :class:`CircuitOpenError` (no socket
    is touched); a successful trial closes it, a failed one re-opens it.
    """

    def __init__(
        self,
        name: str = NAME,
        *,
        fail_max: int = 3,
        reset_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.fail_max = fail_max
        self.reset_s = reset_s
        self.clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._trial = False
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        with self._lock:
            return self._state_locked()

    def _state_locked(self) -> str:
        if self._opened_at is None:
            return CLOSED
        if self.clock() - self._opened_at >= self.reset_s:
            return HALF_OPEN
        return OPEN

    def _before(self) -> None:
        with self._lock:
            state = self._state_locked()
            if state == OPEN or (state == HALF_OPEN and self._trial):
                msg = f"circuit breaker {self.name!r} is open"
                raise CircuitOpenError(msg)
            if state == HALF_OPEN:
                self._trial = True

    def _success(self) -> None:
        with self._lock:
            self._failures = 0
            self._opened_at = None
            self._trial = False

    def _failure(self) -> None:
        with self._lock:
            self._failures += 1
            if self._trial or self._failures >= self.fail_max:
                self._opened_at = self.clock()
            self._trial = False

    def call(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        self._before()
        try:
            result = func(*args, **kwargs)
        except Exception:
            self._failure()
            raise
        self._success()
        return result

    async def call_async(self, func: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        self._before()
        try:
            result = await func(*args, **kwargs)
        except Exception:  # a cancellation says nothing about Redis
            self._failure()
            raise
        self._success()
        return result


def redis_breaker(registry: BreakerSource | None = None) -> Breaker:
    """The "redis" breaker of ``registry``, else a private :class:`LocalBreaker`."""
    if registry is not None:
        breaker: Breaker = registry.get(NAME)
        return breaker
    return LocalBreaker(NAME)
