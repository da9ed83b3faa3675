"""The Redis cache tier (issue 7): see docs/cache.md.

* :mod:`.tier` -- :class:`CacheTier` / :class:`NamedCache`: Redis behind the
  "redis" circuit breaker, an in-process LRU in front, TTLs, compression;
* :mod:`.rules` -- compiled rules (in process) and rule-set definitions (Redis);
* :mod:`.traces` -- trace metadata for late-span decisions across workers;
* API key lookups are cached by :class:`betrace.api.keys.ApiKeyStore` through
  :func:`api_key_cache`.
"""

from __future__ import annotations

from betrace.cache.breaker import Breaker, BreakerSource, LocalBreaker, redis_breaker
from betrace.cache.tier import CacheTier, NamedCache
from betrace.config import Settings
from betrace.metrics import StageHooks

__all__ = [
    "Breaker",
    "CacheTier",
    "LocalBreaker",
    "NamedCache",
    "api_key_cache",
    "build_tier",
]

API_KEYS = "api_keys"


def build_tier(
    settings: Settings,
    hooks: StageHooks | None = None,
    breakers: BreakerSource | None = None,
    *,
    namespace: str | None = None,
) -> CacheTier:
    """The cache tier of a worker or CLI process; keys are namespaced by the app id."""
    return CacheTier(
        settings.cache,
        namespace=namespace or settings.app_id,
        hooks=hooks,
        breaker=redis_breaker(breakers),
    )


def api_key_cache(tier: CacheTier) -> NamedCache:
    """The ``api_keys`` cache (key id -> key record) with its TTL tier."""
    return tier.cache(API_KEYS, tier.settings.api_keys_ttl_s)
