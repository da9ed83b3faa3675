"""The Redis cache tier: named caches with TTLs, compression, a breaker and an LRU fallback.

Every named cache (``rules``, ``api_keys``, ``trace_meta``) is two levels:

* an in-process :class:`~betrace.cache.lru.LocalLRU` (bounded, same TTL),
  asked first: it is what answers while Redis is down;
* Redis, shared by every worker and CLI process, asked on a local miss; its
  answers are copied into the LRU.

Writes go to both. Every Redis call goes through the circuit breaker named
``"redis"`` with short socket timeouts and no client-side retries, so a dead
or hung Redis costs at most one timeout per breaker trial, then nothing: the
breaker fails calls at once, lookups fall back to the LRU (a lower hit rate)
and writes are skipped. No caller ever sees a Redis error.

Keys are ``<prefix>:<namespace>:<cache>:<key>``; the namespace (the app id,
i.e. the consumer group) keeps different deployments and test runs apart.
Values are framed by :mod:`betrace.cache.codec` (1-byte header, zlib over the
threshold). The Redis URL may carry a password: it is never logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import Any, TypeVar

import redis
import redis.asyncio as aredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from betrace.cache import codec
from betrace.cache.breaker import CLOSED, Breaker, LocalBreaker
from betrace.cache.lru import LocalLRU
from betrace.config.sections import CacheSettings
from betrace.errors import CircuitOpenError
from betrace.metrics import InMemoryHooks, StageHooks

logger = logging.getLogger(__name__)

STEP_ID = "cache.redis"
#: SET key value PX ttl for every key (KEYS[i] -> ARGV[i + 1], ARGV[1] = ttl ms), atomically.
_MSET_PX = """
for i = 1, #KEYS do
    redis.call('SET', KEYS[i], ARGV[i + 1], 'PX', ARGV[1])
end
return #KEYS
"""
#: Write-behind tasks in flight at most (see CacheTier.spawn).
MAX_PENDING = 16
T = TypeVar("T")
#: What a failed Redis call can raise through the breaker (all become misses / skipped writes).
_FAILURES = (RedisError, OSError, CircuitOpenError, codec.CacheValueError, asyncio.TimeoutError)


def redact(url: str) -> str:
    """``url`` without credentials (``user:password@`` or a ``?password=`` query), for messages."""
    url, query, _ = url.partition("?")
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        url = f"{scheme}://***@{rest.rpartition('@')[2]}"
    return url + ("?***" if query else "")


class CacheTier:
    """One Redis connection (sync and asyncio clients), one breaker, many named caches."""

    def __init__(
        self,
        settings: CacheSettings,
        *,
        namespace: str,
        hooks: StageHooks | None = None,
        breaker: Breaker | None = None,
    ) -> None:
        self.settings = settings
        self.namespace = namespace
        self.hooks: StageHooks = hooks or InMemoryHooks()
        self.breaker: Breaker = breaker or LocalBreaker()
        self.enabled = settings.enabled
        self._url = settings.url.get_secret_value()
        self._sync: redis.Redis | None = None
        self._async: aredis.Redis | None = None
        self._async_loop: asyncio.AbstractEventLoop | None = None
        self._caches: dict[str, NamedCache] = {}
        self._down = False
        #: Outages survived so far; whoever keeps long-lived entries in Redis rewrites them on a change.
        self.recoveries = 0
        self._tasks: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        return f"CacheTier({redact(self._url)!r}, enabled={self.enabled})"

    @property
    def where(self) -> str:
        return redact(self._url)

    # -- clients ----------------------------------------------------------------------

    def _client_kwargs(self) -> dict[str, Any]:
        timeout = self.settings.socket_timeout_s
        return {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "health_check_interval": 0,
        }

    def sync_client(self) -> redis.Redis:
        if self._sync is None:
            self._sync = redis.Redis.from_url(self._url, retry=Retry(NoBackoff(), 0), **self._client_kwargs())
        return self._sync

    def async_client(self) -> aredis.Redis:
        loop = asyncio.get_running_loop()
        if self._async is None or self._async_loop is not loop:
            # A client's connections belong to the loop that opened them.
            self._async = aredis.Redis.from_url(
                self._url, retry=AsyncRetry(NoBackoff(), 0), **self._client_kwargs()
            )
            self._async_loop = loop
        return self._async

    # -- state --------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        """False while Redis is disabled, failing, or its breaker is not closed."""
        return self.enabled and not self._down and self.breaker.state == CLOSED

    def _failed(self, cache: str, exc: BaseException) -> None:
        reason = "breaker_open" if isinstance(exc, CircuitOpenError) else "error"
        self.hooks.count("betrace_cache_errors_total", cache=cache, reason=reason)
        if not self._down:
            logger.warning(
                "redis cache at %s unavailable (%s: %s); serving from the in-process caches",
                self.where,
                type(exc).__name__,
                exc,
            )
        self._down = True

    def _ok(self) -> None:
        if self._down:
            logger.info("redis cache at %s is back", self.where)
            # Redis runs without persistence: after an outage it may be empty.
            self.recoveries += 1
        self._down = False

    def run(self, cache: str, op: str, func: Callable[[redis.Redis], T]) -> T | None:
        """``func(client)`` through the breaker; None (and counted) when Redis fails."""
        if not self.enabled:
            return None
        started = time.perf_counter()
        try:
            result = self.breaker.call(func, self.sync_client())
        except _FAILURES as exc:
            self._failed(cache, exc)
            return None
        self.hooks.observe("betrace_cache_seconds", time.perf_counter() - started, cache=cache, op=op)
        self._ok()
        return result

    async def arun(self, cache: str, op: str, func: Callable[[aredis.Redis], Awaitable[T]]) -> T | None:
        """The asyncio twin of :meth:`run`."""
        if not self.enabled:
            return None
        started = time.perf_counter()
        try:
            result = await self.breaker.call_async(func, self.async_client())
        except _FAILURES as exc:
            self._failed(cache, exc)
            return None
        self.hooks.observe("betrace_cache_seconds", time.perf_counter() - started, cache=cache, op=op)
        self._ok()
        return result

    def ping(self) -> bool:
        return bool(self.run("ping", "ping", lambda r: r.ping()))

    # -- caches -------------------------------------------------------------------------

    def cache(self, name: str, ttl_s: float, *, max_entries: int | None = None) -> NamedCache:
        """The named cache ``name`` (created once; later calls return the same one)."""
        existing = self._caches.get(name)
        if existing is not None:
            return existing
        made = NamedCache(self, name, ttl_s, max_entries or self.settings.local_max_entries)
        self._caches[name] = made
        return made

    def redis_key(self, cache: str, key: str) -> str:
        return f"{self.settings.key_prefix}:{self.namespace}:{cache}:{key}"

    def spawn(self, coro: Coroutine[Any, Any, Any], *, cache: str = "write_behind") -> bool:
        """Run a write-behind coroutine without awaiting it; False (and dropped) past the backlog.

        The backlog bound keeps a hung Redis from piling up writes: each waits
        at most one socket timeout, and past ``MAX_PENDING`` new ones are skipped.
        """
        if len(self._tasks) >= MAX_PENDING:
            coro.close()
            self.hooks.count("betrace_cache_errors_total", cache=cache, reason="backlog")
            return False
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def drain(self) -> None:
        """Wait for the write-behind tasks started so far."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def close(self) -> None:
        if self._sync is not None:
            self._sync.close()
            self._sync = None

    async def aclose(self) -> None:
        await self.drain()
        client, self._async = self._async, None
        if client is not None and self._async_loop is asyncio.get_running_loop():
            await client.aclose()
        self._async_loop = None
        self.close()


class NamedCache:
    """One cache of a tier: bytes values, a TTL, an LRU in front of Redis; see the module docstring."""

    def __init__(self, tier: CacheTier, name: str, ttl_s: float, max_entries: int) -> None:
        self.tier = tier
        self.name = name
        self.ttl_s = ttl_s
        self.local: LocalLRU[bytes] = LocalLRU(max_entries, ttl_s)

    def _ttl_ms(self, ttl_s: float | None) -> int:
        return max(1, int((self.ttl_s if ttl_s is None else ttl_s) * 1000))

    def _hit(self, *, remote: bool, n: int = 1) -> None:
        hooks = self.tier.hooks
        hooks.count("betrace_cache_hits_total", n, cache=self.name)
        if remote:
            hooks.count("betrace_cache_remote_hits_total", n, cache=self.name)
        elif not self.tier.available:
            hooks.count("betrace_cache_fallback_hits_total", n, cache=self.name)

    def _miss(self, n: int = 1) -> None:
        self.tier.hooks.count("betrace_cache_misses_total", n, cache=self.name)

    def _frame(self, value: bytes) -> bytes:
        return codec.encode(value, self.tier.settings.compress_min_bytes)

    def _unframe(self, raw: bytes | None) -> bytes | None:
        if raw is None:
            return None
        try:
            return codec.decode(raw)
        except codec.CacheValueError as exc:
            self.tier.hooks.count("betrace_cache_errors_total", cache=self.name, reason="corrupt")
            logger.warning("cache %s: ignoring a corrupt value: %s", self.name, exc)
            return None

    # -- sync -------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        value = self.local.get(key)
        if value is not None:
            self._hit(remote=False)
            return value
        rkey = self.tier.redis_key(self.name, key)
        value = self._unframe(self.tier.run(self.name, "get", lambda r: _as_bytes(r.get(rkey))))
        if value is None:
            self._miss()
            return None
        self.local.put(key, value)
        self._hit(remote=True)
        return value

    def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        self.local.put(key, value, ttl_s)
        rkey, framed, ttl = self.tier.redis_key(self.name, key), self._frame(value), self._ttl_ms(ttl_s)
        self.tier.run(self.name, "set", lambda r: r.set(rkey, framed, px=ttl))

    def delete(self, key: str) -> None:
        self.local.pop(key)
        rkey = self.tier.redis_key(self.name, key)
        self.tier.run(self.name, "delete", lambda r: r.delete(rkey))

    # -- asyncio --------------------------------------------------------------------------

    async def aget(self, key: str) -> bytes | None:
        return (await self.aget_many([key])).get(key)

    async def aset(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        await self.aset_many({key: value}, ttl_s)

    async def adelete(self, key: str) -> None:
        self.local.pop(key)
        rkey = self.tier.redis_key(self.name, key)
        await self.tier.arun(self.name, "delete", lambda r: r.delete(rkey))

    async def aget_many(self, keys: Iterable[str], *, count_misses: bool = True) -> dict[str, bytes]:
        """Values of ``keys`` that are cached: local hits, then one MGET for the rest."""
        found: dict[str, bytes] = {}
        wanted: list[str] = []
        for key in keys:
            value = self.local.get(key)
            if value is None:
                wanted.append(key)
            else:
                found[key] = value
        if found:
            self._hit(remote=False, n=len(found))
        if not wanted:
            return found
        rkeys = [self.tier.redis_key(self.name, k) for k in wanted]

        async def mget(r: aredis.Redis) -> list[bytes | None]:
            return [_as_bytes(v) for v in await r.mget(rkeys)]

        raw = await self.tier.arun(self.name, "mget", mget)
        remote = 0
        for key, framed in zip(wanted, raw or [None] * len(wanted), strict=True):
            value = self._unframe(framed)
            if value is not None:
                found[key] = value
                self.local.put(key, value)
                remote += 1
        if remote:
            self._hit(remote=True, n=remote)
        if count_misses and len(wanted) > remote:
            self._miss(len(wanted) - remote)
        return found

    async def aset_many(
        self, items: Mapping[str, bytes], ttl_s: float | None = None, *, local: bool = True
    ) -> None:
        """Write ``items`` to Redis in one pipeline (SET PX each), and to the LRU unless not ``local``."""
        if not items:
            return
        if local:
            for key, value in items.items():
                self.local.put(key, value, ttl_s)
        ttl = self._ttl_ms(ttl_s)
        framed = [(self.tier.redis_key(self.name, k), self._frame(v)) for k, v in items.items()]

        keys = [k for k, _ in framed]
        args: list[bytes | int] = [ttl, *(v for _, v in framed)]

        async def mset_px(r: aredis.Redis) -> None:
            # One command for the whole batch: packing N separate SETs costs ~30 us each in redis-py.
            await r.eval(_MSET_PX, len(keys), *keys, *args)

        await self.tier.arun(self.name, "mset", mset_px)

    async def aexists(self, key: str) -> bool | None:
        """Whether Redis holds ``key`` (not the LRU); None when Redis cannot be asked."""
        rkey = self.tier.redis_key(self.name, key)

        async def exists(r: aredis.Redis) -> bool:
            return bool(await r.exists(rkey))

        return await self.tier.arun(self.name, "exists", exists)

    def local_get(self, key: str) -> bytes | None:
        """Only the in-process copy (no Redis, no metrics)."""
        return self.local.get(key)


def _as_bytes(value: object) -> bytes | None:
    """Redis replies as bytes (the clients never decode responses); anything else is a miss."""
    return value if isinstance(value, bytes) else None
