"""Retries of transient cold-storage failures: exponential backoff with full jitter."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import duckdb

from betrace.errors import BetraceError

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: ``guard(fn)`` runs ``fn`` (e.g. through a circuit breaker); the default runs it as is.
Guard = Callable[[Callable[[], T]], T]

FAILPOINT_ENV = "BETRACE_FAILPOINT"


def failpoint(name: str) -> None:
    """Crash tests: SIGKILL this process when ``BETRACE_FAILPOINT`` names this point."""
    if os.environ.get(FAILPOINT_ENV) == name:
        logger.warning("failpoint %s: killing this process (SIGKILL)", name)
        os.kill(os.getpid(), signal.SIGKILL)


def transient(exc: BaseException) -> bool:
    """Worth retrying: refused access, full disk, unreachable endpoint, busy files."""
    if isinstance(exc, BetraceError):
        return exc.retriable
    return isinstance(exc, OSError | duckdb.IOException)


@dataclass(frozen=True, slots=True)
class Backoff:
    attempts: int = 5
    base_s: float = 0.5
    max_s: float = 30.0

    def delay(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, base * 2**attempt)]."""
        return random.uniform(0, min(self.max_s, self.base_s * (2**attempt)))  # noqa: S311 - jitter


async def retrying(what: str, fn: Callable[[], T], backoff: Backoff, guard: Guard[T] | None = None) -> T:
    """Run blocking ``fn`` in a thread until it succeeds, fails permanently, or attempts run out."""
    attempt = 0
    while True:
        try:
            if guard is None:
                return await asyncio.to_thread(fn)
            return await asyncio.to_thread(guard, fn)
        except Exception as exc:
            attempt += 1
            if not transient(exc) or attempt >= backoff.attempts:
                raise
            pause = backoff.delay(attempt)
            logger.warning(
                "archive: %s failed (attempt %d/%d), retrying in %.2f s: %s",
                what,
                attempt,
                backoff.attempts,
                pause,
                exc,
            )
            await asyncio.sleep(pause)
