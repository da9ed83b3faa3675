"""Fixtures of the cache unit tests: a tier on the session's real redis-server."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import SecretStr

from betrace.cache import CacheTier, LocalBreaker
from betrace.config.sections import CacheSettings
from betrace.dev.redis import LocalRedis
from betrace.metrics import InMemoryHooks


def cache_settings(url: str, **overrides: Any) -> CacheSettings:
    return CacheSettings(url=SecretStr(url), socket_timeout_s=0.2, **overrides)


@pytest.fixture
def hooks() -> InMemoryHooks:
    return InMemoryHooks()


@pytest.fixture
def tier(redis_url: str, hooks: InMemoryHooks) -> Iterator[CacheTier]:
    """A tier with its own namespace and a fast breaker (3 failures open it, 0.3 s reset)."""
    made = CacheTier(
        cache_settings(redis_url),
        namespace=f"t{uuid.uuid4().hex[:8]}",
        hooks=hooks,
        breaker=LocalBreaker(fail_max=3, reset_s=0.3),
    )
    yield made
    made.close()


@pytest.fixture
def outage(local_redis: LocalRedis) -> Iterator[LocalRedis]:
    """The test may stop the session Redis; it runs again afterwards whatever happened."""
    yield local_redis
    if not local_redis.ping():
        local_redis.start()
