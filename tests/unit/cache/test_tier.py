"""The cache tier against a real redis-server: framing, TTL tiers, LRU fallback, breaker, recovery."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from betrace.cache import CacheTier, LocalBreaker, codec
from betrace.cache.lru import LocalLRU
from betrace.cache.tier import redact
from betrace.dev.redis import LocalRedis
from betrace.errors import CircuitOpenError
from betrace.metrics import InMemoryHooks
from betrace.resilience.breakers import BreakerPolicy, BreakerRegistry

from .conftest import cache_settings


def _raw(tier: CacheTier, cache: str, key: str) -> bytes | None:
    client = redis.Redis.from_url(tier.settings.url.get_secret_value())
    try:
        value = client.get(tier.redis_key(cache, key))
        assert value is None or isinstance(value, bytes)
        return value
    finally:
        client.close()


def _pttl(tier: CacheTier, cache: str, key: str) -> int:
    client = redis.Redis.from_url(tier.settings.url.get_secret_value())
    try:
        return int(client.pttl(tier.redis_key(cache, key)))  # type: ignore[arg-type]
    finally:
        client.close()


def test_codec_round_trip_and_header() -> None:
    small = b"x" * 100
    big = b'{"rule": "when { a } always { b }"}' * 100
    assert codec.encode(small, 1024) == b"\x00" + small
    framed = codec.encode(big, 1024)
    assert framed[0] == codec.ZLIB
    assert len(framed) < len(big) / 5
    assert codec.decode(framed) == big
    assert codec.decode(codec.encode(small, 1024)) == small
    # Incompressible data over the threshold stays raw rather than grow.
    noise = bytes(range(256)) * 2 + bytes(reversed(range(256))) * 3
    assert codec.decode(codec.encode(noise, 10)) == noise
    for bad in (b"", b"\x07abc", b"\x01not zlib"):
        with pytest.raises(codec.CacheValueError):
            codec.decode(bad)


def test_values_over_1kb_are_stored_compressed_in_redis(tier: CacheTier, hooks: InMemoryHooks) -> None:
    cache = tier.cache("rule_defs", 60.0)
    small, big = b"s" * 1000, (b"0123456789abcdef" * 200)
    cache.set("small", small)
    cache.set("big", big)
    raw_small, raw_big = _raw(tier, "rule_defs", "small"), _raw(tier, "rule_defs", "big")
    assert raw_small == b"\x00" + small
    assert raw_big is not None
    assert raw_big[0] == codec.ZLIB
    assert len(raw_big) < len(big) // 10
    cache.local.clear()  # read from Redis, not from the LRU
    assert cache.get("big") == big
    assert cache.get("small") == small
    assert hooks.total("betrace_cache_remote_hits_total", cache="rule_defs") == 2


def test_ttl_tiers_per_named_cache(tier: CacheTier) -> None:
    short = tier.cache("trace_meta", 0.4)
    long = tier.cache("rule_defs", 3600.0)
    short.set("t1", b"v")
    long.set("r1", b"v")
    assert 0 < _pttl(tier, "trace_meta", "t1") <= 400
    assert 3_590_000 < _pttl(tier, "rule_defs", "r1") <= 3_600_000
    time.sleep(0.6)
    assert short.get("t1") is None  # gone from the LRU and from Redis
    assert _raw(tier, "trace_meta", "t1") is None
    assert long.get("r1") == b"v"


def test_lru_is_bounded_and_expires() -> None:
    now = [0.0]
    lru: LocalLRU[int] = LocalLRU(3, ttl_s=10.0, clock=lambda: now[0])
    for i in range(5):
        lru.put(f"k{i}", i)
    assert len(lru) == 3
    assert lru.evictions == 2
    assert lru.get("k0") is None
    assert lru.get("k2") == 2  # now most recent
    lru.put("k5", 5)
    assert lru.get("k3") is None
    assert lru.get("k2") == 2
    now[0] = 11.0
    assert lru.get("k2") is None


def test_lru_answers_while_redis_is_stopped_then_recovers(
    tier: CacheTier, hooks: InMemoryHooks, outage: LocalRedis
) -> None:
    cache = tier.cache("api_keys", 60.0)
    cache.set("known", b"tenant-a")
    outage.stop()  # the real process goes away
    started = time.monotonic()
    for _ in range(20):
        assert cache.get("known") == b"tenant-a"  # from the LRU, no error
        assert cache.get("unknown") is None  # a miss, no error
    cache.set("during", b"x")  # skipped in Redis, kept locally
    assert cache.get("during") == b"x"
    assert time.monotonic() - started < 2.0, "a dead Redis must not stall callers"
    assert not tier.available
    assert hooks.total("betrace_cache_fallback_hits_total", cache="api_keys") >= 20
    assert hooks.total("betrace_cache_errors_total", cache="api_keys", reason="error") >= 1
    assert hooks.total("betrace_cache_errors_total", cache="api_keys", reason="breaker_open") >= 1

    outage.start()
    time.sleep(0.35)  # the breaker's reset: the next call is the trial
    cache.set("after", b"y")
    assert tier.available
    assert _raw(tier, "api_keys", "after") == b"\x00y"
    assert _raw(tier, "api_keys", "during") is None  # written while down: only the LRU had it
    cache.local.clear()
    assert cache.get("after") == b"y"


@pytest.mark.asyncio
async def test_async_batches_fall_back_and_recover(
    tier: CacheTier, hooks: InMemoryHooks, outage: LocalRedis
) -> None:
    cache = tier.cache("trace_meta", 60.0)
    await cache.aset_many({f"t{i}": f"v{i}".encode() for i in range(50)})
    cache.local.clear()
    found = await cache.aget_many([f"t{i}" for i in range(60)])
    assert found == {f"t{i}": f"v{i}".encode() for i in range(50)}
    assert hooks.total("betrace_cache_misses_total", cache="trace_meta") == 10

    outage.stop(kill=True)  # kill -9 this time
    assert await cache.aget_many(["t1", "t51"]) == {"t1": b"v1"}  # LRU copy from the MGET
    cache.local.clear()
    assert await cache.aget_many(["t1"]) == {}  # no copy, no Redis: a miss, no error
    await cache.aset_many({"x": b"1"})
    outage.start()
    await asyncio.sleep(0.35)
    assert await cache.aget_many(["t1"]) == {}  # Redis restarted empty (no persistence)
    await cache.aset_many({"y": b"2"})
    cache.local.clear()
    assert await cache.aget_many(["y"]) == {"y": b"2"}
    await tier.aclose()


def test_registry_breaker_trips_and_closes(redis_url: str, outage: LocalRedis) -> None:
    registry = BreakerRegistry(
        BreakerPolicy(failure_ratio=0.5, window_seconds=30.0, min_calls=3, reset_timeout_seconds=0.5)
    )
    hooks = InMemoryHooks()
    tier = CacheTier(
        cache_settings(redis_url), namespace="breaker", hooks=hooks, breaker=registry.get("redis")
    )
    cache = tier.cache("api_keys", 60.0)
    try:
        cache.set("k", b"v")
        assert registry.get("redis").state == "closed"
        outage.stop()
        for i in range(6):
            cache.get(f"missing{i}")
        assert registry.get("redis").state == "open"
        with pytest.raises(CircuitOpenError):
            registry.get("redis").call(lambda: None)
        outage.start()
        time.sleep(0.6)
        assert cache.get("k") == b"v"  # LRU; then a Redis call closes the breaker
        cache.set("k2", b"v2")
        assert registry.get("redis").state == "closed"
        assert tier.available
    finally:
        tier.close()


def test_disabled_tier_never_touches_redis(redis_url: str) -> None:
    hooks = InMemoryHooks()
    tier = CacheTier(cache_settings(redis_url, enabled=False), namespace="off", hooks=hooks)
    cache = tier.cache("api_keys", 60.0)
    cache.set("k", b"v")
    assert cache.get("k") == b"v"
    assert _raw(tier, "api_keys", "k") is None
    assert not tier.available


def test_password_never_in_repr_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    tier = CacheTier(
        cache_settings("redis://:hunter2secret@127.0.0.1:1/0"),
        namespace="pw",
        breaker=LocalBreaker(fail_max=1, reset_s=60),
    )
    with caplog.at_level("DEBUG"):
        assert tier.cache("api_keys", 1.0).get("k") is None
    assert "hunter2secret" not in repr(tier)
    assert "hunter2secret" not in caplog.text
    assert "***@127.0.0.1:1" in caplog.text
    tier.close()


def test_redact_hides_every_form_of_credentials() -> None:
    assert redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redact("redis://:s3cret@redis:6379/0") == "redis://***@redis:6379/0"
    assert redact("rediss://user:s3cret@h:1/2") == "rediss://***@h:1/2"
    assert redact("unix:///run/redis.sock?db=0&password=s3cret") == "unix:///run/redis.sock?***"
