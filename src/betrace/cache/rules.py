"""Rule-set caching: compiled rules in process, rule-set definitions in Redis.

What is cached where (compiled rules are closures over Arrow kernels: they
cannot leave the process, and unpickling code from a network cache would be
a remote-code-execution hole, so they never do):

* **in-process LRU** ``rules``: content hash of a rule version -> its
  compiled object. Every compile in the worker goes through it: the YAML
  seed check, each rule-set swap of the watcher, every re-read of the rules
  topic after a reconnect, and the start-up warm. An unchanged rule is parsed
  and compiled once per process.
* **Redis** ``rule_defs``: per tenant, the canonical JSON definitions of the
  rule set in force, under ``<tenant>:<set digest>``, plus ``<tenant>:current``
  (the digest in force) and ``tenants`` (the tenant list). A starting or an
  additional worker reads them before the rules topic (:meth:`warm`): its
  compiles then happen while it connects, the topic read finds them in the
  LRU, and when neither the topic nor the local copy is available the worker
  can start from these definitions.

Retired versions are dropped from the LRU (:meth:`retire`): a live compiled
rule keeps its attribute keys registered for the batch prefetch.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict
from typing import Any

import orjson

from betrace.cache.lru import LocalLRU
from betrace.cache.tier import CacheTier, NamedCache
from betrace.errors import RuleError
from betrace.metrics import InMemoryHooks, StageHooks
from betrace.rules.engine import compile_rule
from betrace.rules.model import CompiledRule, Rule

logger = logging.getLogger(__name__)

COMPILED = "rules"
DEFINITIONS = "rule_defs"
_FOREVER_S = 10 * 365 * 86400.0  # compiled entries leave by LRU order or retire(), never by age


def rule_digest(rule: Rule) -> str:
    """Content hash of one rule version (every field: the compiled object carries them all)."""
    return hashlib.sha256(orjson.dumps(asdict(rule), option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


def set_digest(rules: Iterable[Rule]) -> str:
    """Content hash of a tenant's rule set (order-independent)."""
    return hashlib.sha256("".join(sorted(rule_digest(r) for r in rules)).encode()).hexdigest()[:32]


def _rule_from(doc: Mapping[str, Any]) -> Rule:
    return Rule(**{k: doc[k] for k in Rule.__dataclass_fields__})


class RuleSetCache:
    """See the module docstring. ``tier=None``: the LRU alone (no Redis)."""

    def __init__(
        self,
        tier: CacheTier | None = None,
        *,
        max_compiled: int = 10_000,
        ttl_s: float = 86_400.0,
        hooks: StageHooks | None = None,
        compile_fn: Callable[[Rule], CompiledRule] = compile_rule,
    ) -> None:
        self.tier = tier
        self.hooks: StageHooks = hooks or (tier.hooks if tier is not None else InMemoryHooks())
        self.compiled: LocalLRU[CompiledRule] = LocalLRU(max_compiled, _FOREVER_S)
        self.definitions: NamedCache | None = tier.cache(DEFINITIONS, ttl_s) if tier is not None else None
        self.compile_fn = compile_fn
        self.compiles = 0
        self._published: dict[str, str] = {}
        self._published_at = 0.0
        self._last_check = 0.0
        self.ttl_s = ttl_s

    # -- compiled objects (in process) ---------------------------------------------------

    def compile(self, rule: Rule) -> CompiledRule:
        """The compiled ``rule``: from the LRU when this exact version was compiled before."""
        key = rule_digest(rule)
        compiled = self.compiled.get(key)
        if compiled is not None:
            self.hooks.count("betrace_cache_hits_total", cache=COMPILED)
            if self.tier is not None and not self.tier.available:
                self.hooks.count("betrace_cache_fallback_hits_total", cache=COMPILED)
            return compiled
        self.hooks.count("betrace_cache_misses_total", cache=COMPILED)
        compiled = self.compile_fn(rule)  # RuleError propagates: nothing is cached for it
        self.compiles += 1
        self.compiled.put(key, compiled)
        return compiled

    def retire(self, live: Iterable[Rule]) -> int:
        """Forget compiled versions of rules whose version in force is another one."""
        in_force = {(r.tenant, r.id): rule_digest(r) for r in live}
        doomed = []
        for key in self.compiled.snapshot():
            compiled = self.compiled.get(key)
            if compiled is None:
                continue
            rule = compiled.rule
            current = in_force.get((rule.tenant, rule.id))
            if current is not None and current != key:
                doomed.append(key)
        for key in doomed:
            self.compiled.pop(key)
        return len(doomed)

    async def release(self) -> None:
        """Close the Redis connections opened in the running event loop (reopened on next use)."""
        if self.tier is not None:
            await self.tier.aclose()

    # -- definitions (Redis) ----------------------------------------------------------------

    async def publish(self, rules: Iterable[Rule]) -> int:
        """Store the definitions of the rule sets in force, per tenant; returns tenants written."""
        if self.definitions is None:
            return 0
        by_tenant: dict[str, list[Rule]] = {}
        for rule in rules:
            by_tenant.setdefault(rule.tenant, []).append(rule)
        items: dict[str, bytes] = {}
        for tenant, tenant_rules in by_tenant.items():
            digest = set_digest(tenant_rules)
            if self._published.get(tenant) == digest:
                continue
            docs = sorted((asdict(r) for r in tenant_rules), key=lambda d: (d["id"], d["version"]))
            items[f"{tenant}:{digest}"] = orjson.dumps({"tenant": tenant, "digest": digest, "rules": docs})
            items[f"{tenant}:current"] = digest.encode()
        if not items:
            return 0
        items["tenants"] = orjson.dumps(sorted(by_tenant))
        await self.definitions.aset_many(items)
        if self.definitions.tier.available:
            for tenant, tenant_rules in by_tenant.items():
                self._published[tenant] = set_digest(tenant_rules)
            self._published_at = time.monotonic()
        return sum(1 for k in items if k.endswith(":current"))

    async def refresh(self, rules: Iterable[Rule], *, every_s: float = 10.0) -> int:
        """Rewrite the definitions if Redis lost them (a restart, an eviction) or they near their TTL.

        At most one ``EXISTS`` per ``every_s``; returns the tenants rewritten.
        """
        if self.definitions is None or time.monotonic() - self._last_check < every_s:
            return 0
        self._last_check = time.monotonic()
        present = await self.definitions.aexists("tenants")
        if present is None or (present and time.monotonic() - self._published_at < self.ttl_s / 2):
            return 0  # Redis unreachable (nothing to do now), or the definitions are there and fresh
        self._published.clear()
        return await self.publish(rules)

    async def warm(self) -> list[CompiledRule]:
        """Compile the rule sets Redis says are in force into the LRU; [] without Redis or data."""
        if self.definitions is None:
            return []
        raw = await self.definitions.aget("tenants")
        try:
            tenants: list[str] = orjson.loads(raw) if raw is not None else []
        except orjson.JSONDecodeError:
            tenants = []
        if not tenants:
            return []
        current = await self.definitions.aget_many([f"{t}:current" for t in tenants])
        wanted = [f"{t}:{d.decode()}" for t in tenants if (d := current.get(f"{t}:current"))]
        sets = await self.definitions.aget_many(wanted)
        warmed: list[CompiledRule] = []
        for key, value in sets.items():
            try:
                doc = orjson.loads(value)
                rules = [_rule_from(d) for d in doc["rules"]]
            except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                logger.warning("ignoring unreadable cached rule set %s: %s", key, exc)
                continue
            if set_digest(rules) != doc.get("digest"):
                logger.warning("ignoring cached rule set %s: its digest does not match its rules", key)
                continue
            for rule in rules:
                try:
                    warmed.append(self.compile(rule))
                except RuleError as exc:
                    logger.warning("cached rule %s/%s v%d does not compile: %s", *_ref(rule), exc)
        if warmed:
            logger.info("rules cache warmed: %d rule(s) of %d tenant(s) from Redis", len(warmed), len(sets))
        return warmed


def _ref(rule: Rule) -> tuple[str, str, int]:
    return rule.tenant, rule.id, rule.version
