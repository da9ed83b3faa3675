"""What is cached: rule sets, API key lookups and trace metadata, on a real redis-server."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from betrace.agents.assembly import summary as sm
from betrace.agents.assembly.state import Decision, decode_decision, encode_decision
from betrace.api.keys import ApiKeyStore, AuthError
from betrace.cache import CacheTier, api_key_cache
from betrace.cache.rules import RuleSetCache, rule_digest, set_digest
from betrace.cache.traces import TraceMetaCache
from betrace.dev.redis import LocalRedis
from betrace.errors import RuleError
from betrace.metrics import InMemoryHooks
from betrace.rules.engine import compile_rule
from betrace.rules.loader import load_rules
from betrace.rules.model import Rule

ROOT = Path(__file__).resolve().parents[3]

RULES = [
    Rule(id="pii-audit", tenant="acme", name="pii", expression="when { pii.access } always { audit.log }"),
    Rule(id="fraud", tenant="acme", name="f", expression="when { payment.charge } always { fraud.check }"),
    Rule(id="slow", tenant="beta", name="s", expression="{ duration > 2s }", language="traceql"),
]


def test_compiled_rules_are_reused_by_content_hash(tier: CacheTier, hooks: InMemoryHooks) -> None:
    cache = RuleSetCache(tier)
    first = [cache.compile(r) for r in RULES]
    again = [cache.compile(r) for r in RULES]
    assert all(a is b for a, b in zip(first, again, strict=True))
    assert cache.compiles == 3
    assert hooks.total("betrace_cache_hits_total", cache="rules") == 3
    assert hooks.total("betrace_cache_misses_total", cache="rules") == 3
    # A new version is new content: compiled once, and the old version is retired.
    v2 = replace(
        RULES[0], version=2, expression="when { pii.access } always { audit.log } never { pii.leak }"
    )
    compiled_v2 = cache.compile(v2)
    assert compiled_v2.rule.version == 2
    assert cache.retire([v2, *RULES[1:]]) == 1
    assert rule_digest(RULES[0]) not in cache.compiled
    with pytest.raises(RuleError):
        cache.compile(replace(RULES[0], version=3, expression="when { broken"))


def test_yaml_seed_and_watcher_compile_each_rule_once(tier: CacheTier) -> None:
    cache = RuleSetCache(tier)
    ruleset = load_rules(ROOT / "config" / "rules", cache.compile)
    n = len(ruleset.rules)
    assert n >= 4
    assert cache.compiles == n  # the YAML check and the RuleSet share one compile per rule
    for rule in ruleset.rules:
        cache.compile(rule)
    assert cache.compiles == n


@pytest.mark.asyncio
async def test_a_second_worker_warms_from_the_definitions_in_redis(tier: CacheTier) -> None:
    first = RuleSetCache(tier)
    assert await first.publish(RULES) == 2  # two tenants
    assert await first.publish(RULES) == 0  # unchanged: nothing rewritten
    # Another process: a fresh tier (empty LRUs) in the same namespace.
    other_hooks = InMemoryHooks()
    other_tier = CacheTier(tier.settings, namespace=tier.namespace, hooks=other_hooks)
    second = RuleSetCache(other_tier)
    warmed = await second.warm()
    assert sorted((c.rule.tenant, c.rule.id) for c in warmed) == sorted((r.tenant, r.id) for r in RULES)
    assert second.compiles == 3
    # The topic read that follows finds every rule compiled already.
    for rule in RULES:
        second.compile(rule)
    assert second.compiles == 3
    assert other_hooks.total("betrace_cache_remote_hits_total", cache="rule_defs") >= 3
    # The stored definitions are the canonical rule fields under the set digest.
    raw = await second.definitions.aget(f"acme:{set_digest(RULES[:2])}")  # type: ignore[union-attr]
    assert raw is not None
    assert [d["id"] for d in orjson.loads(raw)["rules"]] == ["fraud", "pii-audit"]
    await other_tier.aclose()
    await tier.aclose()


@pytest.mark.asyncio
async def test_warm_without_redis_is_empty_not_an_error(tier: CacheTier, outage: LocalRedis) -> None:
    outage.stop()
    cache = RuleSetCache(tier)
    assert await cache.warm() == []
    assert await cache.publish(RULES) == 2  # the attempt is made (and skipped) without raising
    assert compile_rule(RULES[0]).rule == cache.compile(RULES[0]).rule
    await tier.aclose()


def test_api_key_lookups_are_cached_and_revocation_invalidates(
    tier: CacheTier, hooks: InMemoryHooks, tmp_path: Path
) -> None:
    path = tmp_path / "apikeys.json"
    store = ApiKeyStore(path, api_key_cache(tier))
    key, token = store.create("acme")
    for _ in range(10):
        assert store.authenticate(token).tenant == "acme"
    assert hooks.total("betrace_cache_hits_total", cache="api_keys") >= 9
    # Another process (a fresh store and tier, same Redis): answered by Redis.
    other_hooks = InMemoryHooks()
    other = ApiKeyStore(
        path, api_key_cache(CacheTier(tier.settings, namespace=tier.namespace, hooks=other_hooks))
    )
    assert other.authenticate(token).tenant == "acme"
    assert other_hooks.total("betrace_cache_remote_hits_total", cache="api_keys") == 1
    # A wrong secret for a cached key id still fails: the digest is checked every time.
    with pytest.raises(AuthError):
        store.authenticate(token[:-4] + "AAAA")
    # Revoked by a process without any cache: the file stamp invalidates every cached record.
    assert ApiKeyStore(path).revoke(key.key_id, "acme")
    with pytest.raises(AuthError, match="revoked"):
        store.authenticate(token)
    with pytest.raises(AuthError, match="revoked"):
        other.authenticate(token)


def test_revoke_deletes_the_cached_record(tier: CacheTier, tmp_path: Path) -> None:
    store = ApiKeyStore(tmp_path / "apikeys.json", api_key_cache(tier))
    key, token = store.create("acme")
    store.authenticate(token)
    cache = api_key_cache(tier)
    assert cache.get(key.key_id) is not None
    store.revoke(key.key_id, "acme")
    assert cache.local_get(key.key_id) is None
    with pytest.raises(AuthError, match="revoked"):
        store.authenticate(token)


def _decision(tenant: str, closed_at: float) -> bytes:
    return encode_decision(
        Decision(tenant=tenant, partition=0, closed_at=closed_at, hw=41, windows=1, summaries={})
    )


@pytest.mark.asyncio
async def test_trace_meta_write_through_and_batched_lookup(tier: CacheTier, hooks: InMemoryHooks) -> None:
    rules = {"acme": [compile_rule(RULES[0])]}

    def meta_cache(t: CacheTier) -> TraceMetaCache:
        return TraceMetaCache(
            t,
            ttl_s=600.0,
            rules_for=lambda tenant: rules.get(tenant, []),  # type: ignore[arg-type,return-value]
            decision_window_s=lambda tenant: 300.0 if tenant == "acme" else 1.0,
        )

    writer = meta_cache(tier)
    now = time.time()
    await writer.write_through(
        {
            "a" * 32: _decision("acme", now),
            "b" * 32: _decision("acme", now - 299.5),  # ~0.5 s of its window left
            "c" * 32: _decision("short", now - 5),  # already past its tenant's window: not written
        }
    )
    other_hooks = InMemoryHooks()
    reader = meta_cache(CacheTier(tier.settings, namespace=tier.namespace, hooks=other_hooks))
    found = await reader.lookup(["a" * 32, "b" * 32, "c" * 32, "d" * 32])
    assert sorted(found) == ["a" * 32, "b" * 32]
    decision = decode_decision(3, found["a" * 32])
    assert (decision.tenant, decision.hw, decision.windows, decision.partition) == ("acme", 41, 1, 3)
    meta = await reader.meta("a" * 32)
    assert meta is not None
    assert (meta["tenant"], meta["state"], meta["verdict"]) == ("acme", "decided", "pass")
    assert other_hooks.total("betrace_cache_misses_total", cache="trace_meta") == 2
    await reader.cache.tier.aclose()
    await tier.aclose()


@pytest.mark.asyncio
async def test_definitions_are_rewritten_after_redis_comes_back_empty(
    tier: CacheTier, outage: LocalRedis
) -> None:
    cache = RuleSetCache(tier)
    assert await cache.publish(RULES) == 2
    assert await cache.refresh(RULES, every_s=0) == 0  # present and fresh: one EXISTS, no write
    outage.stop(kill=True)
    assert await cache.refresh(RULES, every_s=0) == 0  # unreachable: nothing to do, no error
    outage.start()  # no persistence: everything is gone
    await asyncio.sleep(0.35)  # past the test breaker's reset
    rewritten = 0
    for _ in range(3):  # the first call may still meet the connection the server dropped
        rewritten = await cache.refresh(RULES, every_s=0)
        if rewritten:
            break
        await asyncio.sleep(0.35)
    assert rewritten == 2  # rewritten although the rules did not change
    assert await cache.refresh(RULES, every_s=0) == 0
    assert await cache.refresh(RULES) == 0  # not due yet: no call at all
    fresh = RuleSetCache(CacheTier(tier.settings, namespace=tier.namespace))
    assert len(await fresh.warm()) == 3
    await fresh.release()
    await tier.aclose()


@pytest.mark.asyncio
async def test_trace_meta_from_decision_objects_equals_decoding_the_bytes(tier: CacheTier) -> None:
    compiled = compile_rule(RULES[0])
    key = sm.rule_key(compiled)
    now = time.time()
    decisions = {
        "e" * 32: Decision("acme", 0, now, 9, 1, {key: sm.RuleSummary(counts=[1, 0])}),  # pii, no audit
        "f" * 32: Decision("acme", 0, now, 9, 1, {key: sm.RuleSummary(counts=[1, 1])}),
    }
    encoded = {t: encode_decision(d) for t, d in decisions.items()}

    def meta_cache(namespace: str) -> TraceMetaCache:
        return TraceMetaCache(
            CacheTier(tier.settings, namespace=namespace, hooks=InMemoryHooks()),
            ttl_s=600.0,
            rules_for=lambda tenant: [compiled] if tenant == "acme" else [],
            decision_window_s=lambda _tenant: 300.0,
        )

    from_bytes, from_objects = meta_cache(f"{tier.namespace}-b"), meta_cache(f"{tier.namespace}-o")
    await from_bytes.write_through(encoded)
    await from_objects.write_through(encoded, decisions)
    for trace_id, verdict in (("e" * 32, "violation"), ("f" * 32, "pass")):
        a, b = await from_bytes.meta(trace_id), await from_objects.meta(trace_id)
        assert a is not None and b is not None
        assert (a["verdict"], b["verdict"]) == (verdict, verdict)
        assert a == b
    assert await from_objects.lookup(list(encoded)) == await from_bytes.lookup(list(encoded))
    for cache in (from_bytes, from_objects):
        await cache.cache.tier.aclose()
