"""Hot reload: follow the rules topic and swap the evaluate stage's RuleSet.

:class:`RuleWatcher` is a :class:`~betrace.rules.loader.RuleSource`. It
reads the compacted rules topic from the beginning, then follows it; after
every change it compiles the rules in force (reusing compiled versions that
did not change) into a new :class:`RuleSet` and replaces the reference in
one assignment, so a batch is evaluated with either the old or the new set,
never a mix. A change is visible within about a poll interval (0.5 s).

It keeps a local copy of the applied records (a JSON file under the data
directory): if the broker is unreachable at start, the worker starts from
that copy and keeps retrying in the background. Rules given as ``seed``
(the YAML files) are published as version 1 when the topic has no version of
that rule at all; after that the topic is authoritative.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from aiokafka.errors import KafkaError

from betrace.audit.events import AuditRecorder
from betrace.audit.rules import RuleAuditor
from betrace.errors import BrokerError, RuleError
from betrace.rules.engine import compile_rule
from betrace.rules.loader import RuleSet
from betrace.rules.model import CompiledRule, Rule
from betrace.rules.registry import DEFAULT_TOPIC, RegistryState, seed_versions
from betrace.rules.store import TopicReader, ensure_rules_topic, publish

if TYPE_CHECKING:
    from betrace.cache.rules import RuleSetCache

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
SEED_AUTHOR = "betrace-seed"


def cache_path_for(data_dir: Path, topic: str) -> Path:
    """Where a worker keeps its local copy of ``topic``."""
    return data_dir / f"rules-cache.{topic}.json"


class RuleWatcher:
    """Keeps :meth:`current` in step with the rules topic; see the module docstring."""

    def __init__(
        self,
        brokers: str,
        topic: str = DEFAULT_TOPIC,
        *,
        cache_path: Path | None = None,
        seed: Sequence[Rule] = (),
        replication_factor: int = 1,
        timeout_s: float = 10.0,
        poll_ms: int = 500,
        retry_s: float = 2.0,
        rule_cache: RuleSetCache | None = None,
        warm: bool = True,
        audit: AuditRecorder | None = None,
    ) -> None:
        self.brokers = brokers
        self.topic = topic
        self.cache_path = cache_path
        self.seed = list(seed)
        self.replication_factor = replication_factor
        self.timeout_s = timeout_s
        self.poll_ms = poll_ms
        self.retry_s = retry_s
        #: Incremented on every swap; lets callers and tests see that a change landed.
        self.generation = 0
        self.state = RegistryState()
        self._ruleset = RuleSet(())
        self._signature: tuple[tuple[str, str, int], ...] = ()
        self._compiled: dict[Rule, CompiledRule] = {}
        self._broken: dict[Rule, RuleError] = {}
        self._cached_records = -1
        self._primed = False
        self._task: asyncio.Task[None] | None = None
        #: Compiles through the cache tier (see betrace.cache.rules) when given.
        self.rule_cache = rule_cache
        self.warm = warm
        #: Records each rule version in the audit trail once (see betrace.audit.rules).
        self.auditor = RuleAuditor(audit) if audit is not None else None
        self._publishes: set[asyncio.Task[int]] = set()

    # -- RuleSource ------------------------------------------------------------------

    def current(self) -> RuleSet:
        return self._ruleset

    # -- lifecycle -------------------------------------------------------------------

    async def prime(self) -> RuleSet:
        """Load the rules before the worker starts evaluating.

        Creates the compacted topic if needed, publishes the seed rules that
        have no version yet, and reads the topic to its end. If the broker
        cannot be reached, falls back to the local copy; with no copy either,
        raises :class:`BrokerError` (the worker must not run rule-less).
        """
        warmed: list[CompiledRule] = []
        if self.rule_cache is not None and self.warm:
            # Compiles what Redis says is in force, so the topic read below finds it in the LRU.
            warmed = await self.rule_cache.warm()
        try:
            reader = await self._sync()
            await reader.close()
        except BrokerError as exc:
            if self._load_cache():
                logger.warning("rules topic unavailable (%s); using the local copy %s", exc, self.cache_path)
            elif warmed:
                logger.warning(
                    "rules topic unavailable (%s) and no local copy; using the rules cached in Redis", exc
                )
                self._ruleset = RuleSet.from_compiled(warmed)
                self.generation += 1
            else:
                raise
        finally:
            if self.rule_cache is not None:
                # prime() often runs in its own event loop (before faust's): close its connections.
                await self.drain()
                await self.rule_cache.release()
        self._primed = True
        return self._ruleset

    async def start(self) -> None:
        """Prime (if not done) and follow the topic in a background task of the running loop."""
        if not self._primed:
            await self.prime()
        if self._task is None:
            self._task = asyncio.create_task(self._follow(), name=f"betrace.rules.watch:{self.topic}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def run(self) -> None:
        """``start``, then wait until cancelled (e.g. as a faust ``app.task``), then ``stop``."""
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.stop()

    # -- internals -------------------------------------------------------------------

    async def _sync(self) -> TopicReader:
        """Read the topic to its end (seeding if needed) and install it; the caller closes the reader."""
        await ensure_rules_topic(
            self.brokers, self.topic, replication_factor=self.replication_factor, timeout_s=self.timeout_s
        )
        reader = TopicReader(self.brokers, self.topic)
        await reader.open(self.timeout_s, topic_wait_s=self.timeout_s)
        try:
            await reader.catch_up(self.timeout_s)
            seeds = seed_versions(
                reader.state, self.seed, author=SEED_AUTHOR, reason="bootstrap from the YAML rule files"
            )
            if seeds:
                await publish(self.brokers, self.topic, seeds, timeout_s=self.timeout_s)
                logger.info("seeded %d rule(s) into %s", len(seeds), self.topic)
                await reader.catch_up(self.timeout_s)
            self._install(reader)
        except BaseException:
            await reader.close()
            raise
        return reader

    async def _follow(self) -> None:
        reader: TopicReader | None = None
        while True:
            try:
                # A fresh read from the beginning after every (re)connect: correct whatever was missed.
                reader = await self._sync()
                while True:
                    if await reader.poll(self.poll_ms):
                        self._install(reader)
                    elif self.rule_cache is not None:
                        # Redis may have lost the definitions (restart without persistence, eviction).
                        await self.rule_cache.refresh(self._ruleset.rules)
            except (BrokerError, RuleError, KafkaError, OSError) as exc:
                logger.warning("rules topic %s: %s; retrying in %.0fs", self.topic, exc, self.retry_s)
            finally:
                if reader is not None:
                    await reader.close()
                    reader = None
            await asyncio.sleep(self.retry_s)

    def _compile(self, rule: Rule) -> CompiledRule:
        if self.rule_cache is not None:
            broken = self._broken.get(rule)
            if broken is not None:
                raise broken
            try:
                return self.rule_cache.compile(rule)
            except RuleError as exc:
                self._broken[rule] = exc
                raise
        compiled = self._compiled.get(rule)
        if compiled is not None:
            return compiled
        broken = self._broken.get(rule)
        if broken is not None:
            raise broken
        try:
            compiled = compile_rule(rule)
        except RuleError as exc:
            self._broken[rule] = exc
            raise
        self._compiled[rule] = compiled
        return compiled

    def _install(self, reader: TopicReader) -> None:
        self.state = reader.state
        if self.auditor is not None:
            self.auditor.observe(self.state)
        self._activate()
        if len(reader.records) != self._cached_records:
            self._write_cache(reader.records)

    def _activate(self) -> None:
        compiled = self.state.active(self._compile)
        signature = tuple((c.rule.tenant, c.rule.id, c.rule.version) for c in compiled)
        if signature == self._signature:
            return
        before = set(self._signature)
        self._ruleset = RuleSet.from_compiled(compiled)  # the atomic swap
        self._signature = signature
        self.generation += 1
        # Drop compiled versions no longer in force (they hold attribute-key registrations).
        live = {c.rule for c in compiled}
        self._compiled = {rule: c for rule, c in self._compiled.items() if rule in live}
        if self.rule_cache is not None:
            self.rule_cache.retire(live)
            self._publish_soon(list(live))
        added = sorted(f"{t}/{i}@v{v}" for t, i, v in set(signature) - before)
        removed = sorted(f"{t}/{i}@v{v}" for t, i, v in before - set(signature))
        logger.info(
            "rules: %d in force for %d tenant(s); now in force: %s; retired: %s",
            len(compiled),
            len(self._ruleset.tenants),
            ", ".join(added) or "-",
            ", ".join(removed) or "-",
        )

    def _publish_soon(self, rules: list[Rule]) -> None:
        """Write the rule sets in force to Redis in the background (never delays the swap)."""
        if self.rule_cache is None:
            return
        try:
            task = asyncio.get_running_loop().create_task(self.rule_cache.publish(rules))
        except RuntimeError:  # no loop (a synchronous caller): nothing to share with
            return
        self._publishes.add(task)
        task.add_done_callback(self._publishes.discard)

    async def drain(self) -> None:
        """Wait for background publishes to Redis (tests and orderly shutdown)."""
        while self._publishes:
            await asyncio.gather(*list(self._publishes), return_exceptions=True)

    # -- local copy --------------------------------------------------------------------

    def _write_cache(self, records: list[tuple[bytes | None, bytes | None]]) -> None:
        if self.cache_path is None:
            return
        doc: dict[str, Any] = {
            "format": CACHE_FORMAT,
            "topic": self.topic,
            "records": [
                {"key": k.decode(), "value": v.decode()}
                for k, v in records
                if k is not None and v is not None
            ],
        }
        try:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_path.with_name(f"{self.cache_path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(orjson.dumps(doc))
            tmp.replace(self.cache_path)  # atomic: a crash leaves the old copy or the new one
            self._cached_records = len(records)
        except OSError as exc:
            logger.warning("cannot write the local rules copy %s: %s", self.cache_path, exc)

    def _load_cache(self) -> bool:
        if self.cache_path is None or not self.cache_path.is_file():
            return False
        try:
            doc = orjson.loads(self.cache_path.read_bytes())
            if doc.get("format") != CACHE_FORMAT or doc.get("topic") != self.topic:
                logger.warning("ignoring the local rules copy %s: other format or topic", self.cache_path)
                return False
            state = RegistryState()
            for record in doc["records"]:
                state.apply_record(record["key"].encode(), record["value"].encode())
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            logger.warning("ignoring the unreadable local rules copy %s: %s", self.cache_path, exc)
            return False
        self.state = state
        self._activate()
        return True
