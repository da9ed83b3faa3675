"""Cache tier benchmark: steady-state hit rates and latencies, with Redis up and with Redis down.

Starts its own redis-server (Debian's, ``BETRACE_REDIS_SERVER`` or PATH) on
``--port`` in a temporary directory and runs three steady-state workloads
through the real cache code, once with Redis up and once with the server
stopped (the in-process LRUs alone):

* **rules** -- ``--workers`` rule watchers over ``--tenants`` x ``--rules``
  rules; every simulated minute one rule of one tenant changes (each watcher
  swaps its rule set) and each watcher re-reads the topic once (a reconnect);
  every ``--restart-every`` minutes one worker restarts (fresh process: YAML
  seed check, warm from Redis, topic read).
* **api_keys** -- ``--keys`` keys, ``--requests`` authentications with a
  Zipf-like popularity, one revocation every 10,000 requests, and a second
  process (fresh store) serving 10 % of the requests.
* **trace_meta** -- write-through of ``--batch`` decisions per close tick and
  one MGET per input batch of ``--batch`` trace ids (10 % of them decided).

    .venv/bin/python benchmarks/bench_cache.py
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from pydantic import SecretStr  # noqa: E402

from betrace.agents.assembly.state import Decision, encode_decision  # noqa: E402
from betrace.api.keys import ApiKeyStore  # noqa: E402
from betrace.cache import CacheTier, LocalBreaker, api_key_cache  # noqa: E402
from betrace.cache.rules import RuleSetCache  # noqa: E402
from betrace.cache.traces import TraceMetaCache  # noqa: E402
from betrace.config.sections import CacheSettings  # noqa: E402
from betrace.dev.redis import LocalRedis  # noqa: E402
from betrace.metrics import InMemoryHooks  # noqa: E402
from betrace.rules.model import Rule  # noqa: E402
from betrace.rules.registry import RegistryState, encode, propose  # noqa: E402
from betrace.rules.watcher import RuleWatcher  # noqa: E402

UNREACHABLE = "127.0.0.1:1"
EXPRESSIONS = (
    "when {{ svc{i}.pii.access }} always {{ audit.log }}",
    "when {{ payment.charge_card.where(amount > {i}) }} always {{ payment.fraud_check }}",
    '{{ span.http.status_code >= 500 && name = "op{i}" }}',
    "svc{i}.a followed_by svc{i}.b within 30s",
)
LANGS = ("betrace", "betrace", "traceql", "sequence")


@dataclass
class Figures:
    hits: int
    misses: int
    fallback: int
    errors: int
    p50_us: float
    p99_us: float

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def _figures(hooks: InMemoryHooks, cache: str, lat: list[float]) -> Figures:
    lat = sorted(lat) or [0.0]
    return Figures(
        hooks.total("betrace_cache_hits_total", cache=cache),
        hooks.total("betrace_cache_misses_total", cache=cache),
        hooks.total("betrace_cache_fallback_hits_total", cache=cache),
        hooks.total("betrace_cache_errors_total", cache=cache),
        statistics.median(lat) * 1e6,
        lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e6,
    )


def _tier(url: str, namespace: str, hooks: InMemoryHooks) -> CacheTier:
    settings = CacheSettings(url=SecretStr(url), socket_timeout_s=0.1)
    return CacheTier(
        settings, namespace=namespace, hooks=hooks, breaker=LocalBreaker(fail_max=3, reset_s=5.0)
    )


class _Reader:
    def __init__(self) -> None:
        self.state = RegistryState()
        self.records: list[tuple[bytes, bytes]] = []

    def add(self, rule: Rule) -> None:
        version = propose(self.state, rule, author="bench", reason="bench")
        if version is not None:
            record = encode(version)
            self.state.apply_record(*record)
            self.records.append(record)


def bench_rules(url: str, args: argparse.Namespace, hooks: InMemoryHooks) -> list[float]:
    namespace = uuid.uuid4().hex[:8]
    rng = random.Random(1)
    rules = [
        Rule(
            id=f"r{j}",
            tenant=f"t{t}",
            name=f"rule {j}",
            expression=EXPRESSIONS[j % 4].format(i=j),
            language=LANGS[j % 4],  # type: ignore[arg-type]
        )
        for t in range(args.tenants)
        for j in range(args.rules)
    ]
    topic = _Reader()
    for rule in rules:
        topic.add(rule)
    lat: list[float] = []

    async def run() -> None:
        def new_worker() -> RuleWatcher:
            cache = RuleSetCache(_tier(url, namespace, hooks))
            return RuleWatcher(UNREACHABLE, "rules", cache_path=None, rule_cache=cache)

        async def start(watcher: RuleWatcher) -> None:
            assert watcher.rule_cache is not None
            await watcher.rule_cache.warm()
            for rule in rules[: args.rules]:  # the YAML seed of one tenant, checked at start
                watcher.rule_cache.compile(rule)
            timed(watcher)

        def timed(watcher: RuleWatcher) -> None:
            started = time.perf_counter()
            watcher._install(topic)  # type: ignore[arg-type]
            lat.append(time.perf_counter() - started)

        workers = [new_worker() for _ in range(args.workers)]
        for w in workers:
            await start(w)
        for minute in range(1, args.minutes + 1):
            tenant = rng.randrange(args.tenants)
            j = rng.randrange(args.rules)
            latest = topic.state.latest(f"t{tenant}", f"r{j}")
            assert latest is not None
            topic.add(replace(latest.rule, name=f"{latest.rule.name} (edited {minute})"))
            for w in workers:
                timed(w)  # the swap after the change
                timed(w)  # a re-read after a reconnect
            if minute % args.restart_every == 0:
                k = minute // args.restart_every % args.workers
                await workers[k].drain()
                workers[k] = new_worker()
                await start(workers[k])
        for w in workers:
            await w.drain()
            assert w.rule_cache is not None
            await w.rule_cache.release()

    asyncio.run(run())
    return lat


def bench_keys(url: str, args: argparse.Namespace, hooks: InMemoryHooks, tmp: Path) -> list[float]:
    namespace = uuid.uuid4().hex[:8]
    path = tmp / f"keys-{namespace}.json"
    plain = ApiKeyStore(path)
    tokens = [plain.create(f"t{i % 50}")[1] for i in range(args.keys)]
    first = ApiKeyStore(path, api_key_cache(_tier(url, namespace, hooks)))
    second = ApiKeyStore(path, api_key_cache(_tier(url, namespace, hooks)))
    rng = random.Random(2)
    weights = [1.0 / (i + 1) for i in range(args.keys)]
    picks = rng.choices(range(args.keys), weights=weights, k=args.requests)
    revoked: set[int] = set()
    lat: list[float] = []
    for n, i in enumerate(picks):
        if n and n % 10_000 == 0:
            victim = rng.randrange(args.keys)
            key_id = tokens[victim].split("_")[1]
            first.revoke(key_id, f"t{victim % 50}")
            revoked.add(victim)
        store = second if n % 10 == 0 else first
        started = time.perf_counter()
        try:
            store.authenticate(tokens[i])
        except Exception:
            assert i in revoked
        lat.append(time.perf_counter() - started)
    return lat


def bench_plain_keys(args: argparse.Namespace, tmp: Path) -> list[float]:
    path = tmp / f"plain-{uuid.uuid4().hex[:8]}.json"
    store = ApiKeyStore(path)
    tokens = [store.create(f"t{i % 50}")[1] for i in range(args.keys)]
    rng = random.Random(2)
    lat = []
    for i in rng.choices(range(args.keys), k=min(args.requests, 20_000)):
        started = time.perf_counter()
        store.authenticate(tokens[i])
        lat.append(time.perf_counter() - started)
    return lat


def bench_traces(url: str, args: argparse.Namespace, hooks: InMemoryHooks) -> tuple[list[float], list[float]]:
    namespace = uuid.uuid4().hex[:8]
    meta = TraceMetaCache(
        _tier(url, namespace, hooks), ttl_s=600.0, rules_for=lambda _t: [], decision_window_s=lambda _t: 300.0
    )
    rng = random.Random(3)
    decided: list[str] = []
    writes: list[float] = []
    reads: list[float] = []

    async def run() -> None:
        for _ in range(args.ticks):
            now = time.time()
            batch = {uuid.UUID(int=rng.getrandbits(128)).hex: b"" for _ in range(args.batch)}
            values = {t: encode_decision(Decision("acme", 0, now, 10, 1, {})) for t in batch}
            started = time.perf_counter()
            await meta.write_through(values)
            writes.append(time.perf_counter() - started)
            decided.extend(batch)
            # An input batch: mostly new traces, 10 % late spans of decided ones (looked up elsewhere).
            lookups = [uuid.UUID(int=rng.getrandbits(128)).hex for _ in range(args.batch * 9 // 10)]
            lookups += rng.sample(decided, args.batch // 10)
            meta.cache.local.clear()  # another worker: nothing local
            started = time.perf_counter()
            await meta.lookup(lookups)
            reads.append(time.perf_counter() - started)
        await meta.cache.tier.aclose()

    asyncio.run(run())
    return writes, reads


def _pct(lat: list[float]) -> str:
    s = sorted(lat) or [0.0]
    return (
        f"p50 {statistics.median(s) * 1e3:.2f} ms, p99 {s[min(len(s) - 1, int(len(s) * 0.99))] * 1e3:.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, default=16579)
    parser.add_argument("--tenants", type=int, default=20)
    parser.add_argument("--rules", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--minutes", type=int, default=60)
    parser.add_argument("--restart-every", type=int, default=10)
    parser.add_argument("--keys", type=int, default=500)
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--ticks", type=int, default=100)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()
    # The outage phase is meant to fail every Redis call: keep its warnings out of the table.
    logging.basicConfig(level=logging.ERROR)

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        server = LocalRedis(tmp / "redis", port=args.port)
        server.start()
        try:
            rows = []
            for phase in ("redis up", "redis down"):
                if phase == "redis down":
                    server.stop()
                hooks = InMemoryHooks()
                started = time.perf_counter()
                rule_lat = bench_rules(server.url, args, hooks)
                rules = _figures(hooks, "rules", rule_lat)
                key_lat = bench_keys(server.url, args, hooks, tmp)
                keys = _figures(hooks, "api_keys", key_lat)
                writes, reads = bench_traces(server.url, args, hooks)
                traces = _figures(hooks, "trace_meta", reads)
                elapsed = time.perf_counter() - started
                rows.append((phase, rules, keys, traces, writes, reads, elapsed))
        finally:
            server.clean()
        plain = bench_plain_keys(args, tmp)

    print(
        f"# bench_cache: {args.tenants} tenants x {args.rules} rules, {args.workers} workers, "
        f"{args.minutes} min, restart every {args.restart_every} min; {args.keys} keys, "
        f"{args.requests:,} requests; {args.ticks} ticks x {args.batch} trace ids"
    )
    print("| phase | cache | hit rate | hits | misses | fallback hits | errors | latency |")
    print("|---|---|---|---|---|---|---|---|")
    for phase, rules, keys, traces, writes, reads, _ in rows:
        print(
            f"| {phase} | rules (compile lookups) | {rules.hit_rate:.1%} | {rules.hits} | {rules.misses} | "
            f"{rules.fallback} | {rules.errors} | rule-set swap {rules.p50_us / 1e3:.2f} ms p50, "
            f"{rules.p99_us / 1e3:.2f} ms p99 |"
        )
        print(
            f"| {phase} | api_keys | {keys.hit_rate:.1%} | {keys.hits} | {keys.misses} | {keys.fallback} | "
            f"{keys.errors} | authenticate {keys.p50_us:.1f} µs p50, {keys.p99_us:.1f} µs p99 |"
        )
        print(
            f"| {phase} | trace_meta (late-span lookups) | {traces.hit_rate:.1%} | {traces.hits} | "
            f"{traces.misses} | {traces.fallback} | {traces.errors} | write-through of {args.batch}: "
            f"{_pct(writes)}; MGET of {args.batch}: {_pct(reads)} |"
        )
    plain_s = sorted(plain)
    p50, p99 = statistics.median(plain_s) * 1e6, plain_s[int(len(plain_s) * 0.99)] * 1e6
    print(f"| - | api_keys, no cache | - | - | - | - | - | authenticate {p50:.1f} µs p50, {p99:.1f} µs p99 |")


if __name__ == "__main__":
    main()
