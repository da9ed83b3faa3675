"""RuleWatcher with the rules cache: compiles once per version, publishes to Redis, warms a new worker."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from pathlib import Path

import pytest

from betrace.cache import CacheTier
from betrace.cache.rules import RuleSetCache
from betrace.metrics import InMemoryHooks
from betrace.rules.model import Rule
from betrace.rules.registry import RegistryState, encode, propose
from betrace.rules.watcher import RuleWatcher

UNREACHABLE = "127.0.0.1:1"
PII = Rule(id="pii-audit", tenant="t1", name="PII", expression="when { pii.access } always { audit.log }")
FRAUD = Rule(id="fraud", tenant="t2", name="F", expression="when { payment.charge } always { fraud.check }")


class Reader:
    """What RuleWatcher._install reads from a TopicReader."""

    def __init__(self) -> None:
        self.state = RegistryState()
        self.records: list[tuple[bytes, bytes]] = []

    def add(self, rule: Rule) -> None:
        version = propose(self.state, rule, author="a", reason="r")
        assert version is not None
        record = encode(version)
        self.state.apply_record(*record)
        self.records.append(record)


def test_swaps_and_rereads_compile_each_version_once_and_publish(
    tier: CacheTier, hooks: InMemoryHooks
) -> None:
    cache = RuleSetCache(tier)

    async def scenario() -> None:
        watcher = RuleWatcher(UNREACHABLE, "rules", cache_path=None, rule_cache=cache)
        reader = Reader()
        reader.add(PII)
        reader.add(FRAUD)
        watcher._install(reader)  # type: ignore[arg-type]
        for _ in range(5):  # re-reads after reconnects: same rules
            watcher._install(reader)  # type: ignore[arg-type]
        reader.add(replace(PII, expression="when { pii.access } never { pii.leak }"))
        watcher._install(reader)  # type: ignore[arg-type]
        await watcher.drain()
        await tier.aclose()
        assert [c.rule.version for c in watcher.current().for_tenant("t1")] == [2]

    asyncio.run(scenario())
    assert cache.compiles == 3  # v1 and v2 of PII, v1 of FRAUD
    assert hooks.total("betrace_cache_hits_total", cache="rules") == 2 * 5 + 1
    assert cache.definitions is not None
    assert cache.definitions.get("t1:current") is not None


def test_a_new_worker_starts_from_redis_when_topic_and_copy_are_missing(
    tier: CacheTier, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def publish() -> None:
        writer = RuleWatcher(UNREACHABLE, "rules", cache_path=None, rule_cache=RuleSetCache(tier))
        reader = Reader()
        reader.add(PII)
        reader.add(FRAUD)
        writer._install(reader)  # type: ignore[arg-type]
        await writer.drain()
        await tier.aclose()

    asyncio.run(publish())
    fresh_hooks = InMemoryHooks()
    fresh = RuleSetCache(CacheTier(tier.settings, namespace=tier.namespace, hooks=fresh_hooks))

    async def start() -> list[str]:
        watcher = RuleWatcher(
            UNREACHABLE, "rules", cache_path=tmp_path / "none.json", timeout_s=1, rule_cache=fresh
        )
        await watcher.prime()
        await fresh.definitions.tier.aclose()  # type: ignore[union-attr]
        return sorted(
            f"{c.rule.tenant}/{c.rule.id}" for t in ("t1", "t2") for c in watcher.current().for_tenant(t)
        )

    with caplog.at_level(logging.WARNING, logger="betrace"):
        assert asyncio.run(start()) == ["t1/pii-audit", "t2/fraud"]
    assert "using the rules cached in Redis" in caplog.text
    assert fresh.compiles == 2
