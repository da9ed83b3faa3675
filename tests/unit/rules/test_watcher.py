"""RuleWatcher without a broker: atomic swaps, compile reuse, the local copy."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pytest
from rules_spans import make_table

from betrace.agents.evaluate import EvaluateStage
from betrace.errors import BrokerError
from betrace.metrics import InMemoryHooks
from betrace.rules.loader import RuleSet
from betrace.rules.model import Rule
from betrace.rules.registry import RegistryState, encode, propose, set_enabled
from betrace.rules.watcher import RuleWatcher, cache_path_for

UNREACHABLE = "127.0.0.1:1"
PII = Rule(id="pii-audit", tenant="t1", name="PII", expression="when { pii.access } always { audit.log }")


class FakeReader:
    """What RuleWatcher._install reads from a TopicReader."""

    def __init__(self) -> None:
        self.state = RegistryState()
        self.records: list[tuple[bytes, bytes]] = []

    def add(self, rule: Rule | None = None, *, disable: bool = False) -> None:
        if disable:
            version = set_enabled(self.state, PII.tenant, PII.id, enabled=False, author="a", reason="r")
        else:
            assert rule is not None
            found = propose(self.state, rule, author="a", reason="r")
            assert found is not None
            version = found
        record = encode(version)
        self.state.apply_record(*record)
        self.records.append(record)


def violating() -> pa.Table:
    return make_table(
        {"a" * 32: [{"name": "pii.access"}], "b" * 32: [{"name": "pii.access"}, {"name": "audit.log"}]}
    )


def test_changes_swap_the_rule_set_and_signals_name_the_version(tmp_path: Path) -> None:
    watcher = RuleWatcher(UNREACHABLE, "rules", cache_path=tmp_path / "cache.json")
    stage = EvaluateStage(watcher, InMemoryHooks())
    reader = FakeReader()
    assert stage.evaluate(violating()) == []
    reader.add(PII)
    watcher._install(reader)  # type: ignore[arg-type]
    first = watcher.current()
    [doc] = stage.evaluate(violating())
    assert (doc["rule_id"], doc["rule_version"], doc["trace_id"]) == ("pii-audit", 1, "a" * 32)
    reader.add(replace(PII, expression="when { pii.access } never { audit.log }"))
    watcher._install(reader)  # type: ignore[arg-type]
    assert watcher.current() is not first  # a new object, the old one untouched
    assert [c.rule.version for c in first.for_tenant("t1")] == [1]
    [doc] = stage.evaluate(violating())
    assert (doc["rule_version"], doc["trace_id"]) == (2, "b" * 32)
    reader.add(disable=True)
    watcher._install(reader)  # type: ignore[arg-type]
    assert stage.evaluate(violating()) == []
    assert watcher.generation == 3


def test_unrelated_records_do_not_swap_or_recompile(tmp_path: Path) -> None:
    watcher = RuleWatcher(UNREACHABLE, "rules", cache_path=None)
    reader = FakeReader()
    reader.add(PII)
    watcher._install(reader)  # type: ignore[arg-type]
    before, compiled = watcher.current(), watcher.current().for_tenant("t1")[0]
    watcher._install(reader)  # type: ignore[arg-type]
    assert watcher.current() is before
    reader.add(replace(PII, tenant="t2"))
    watcher._install(reader)  # type: ignore[arg-type]
    assert watcher.current().for_tenant("t1")[0] is compiled  # reused, not recompiled


def test_evaluate_reads_the_rule_source_once_per_batch() -> None:
    calls = []
    ruleset = RuleSet([PII])

    def current() -> RuleSet:
        calls.append(1)
        return ruleset

    stage = EvaluateStage(SimpleNamespace(current=current), InMemoryHooks())  # type: ignore[arg-type]
    table = pa.concat_tables([violating(), make_table({"c" * 32: [{"name": "pii.access"}]}, tenant="t2")])
    stage.evaluate(table)
    assert len(calls) == 1


def test_prime_falls_back_to_the_local_copy(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = cache_path_for(tmp_path, "rules")
    writer = RuleWatcher(UNREACHABLE, "rules", cache_path=cache)
    reader = FakeReader()
    reader.add(PII)
    reader.add(replace(PII, id="other"))
    writer._install(reader)  # type: ignore[arg-type]
    assert cache.is_file()

    async def scenario() -> list[str]:
        watcher = RuleWatcher(UNREACHABLE, "rules", cache_path=cache, timeout_s=2, retry_s=0.05)
        await watcher.prime()
        await watcher.start()  # keeps retrying the broker in the background
        await asyncio.sleep(0.2)
        await watcher.stop()
        return sorted(c.rule.id for c in watcher.current().for_tenant("t1"))

    with caplog.at_level(logging.WARNING, logger="betrace"):
        assert asyncio.run(scenario()) == ["other", "pii-audit"]
    assert "using the local copy" in caplog.text


def test_prime_without_broker_or_copy_fails(tmp_path: Path) -> None:
    watcher = RuleWatcher(UNREACHABLE, "rules", cache_path=tmp_path / "missing.json", timeout_s=2)
    with pytest.raises(BrokerError, match="cannot reach"):
        asyncio.run(watcher.prime())


def test_a_copy_of_another_topic_is_ignored(tmp_path: Path) -> None:
    cache = tmp_path / "cache.json"
    writer = RuleWatcher(UNREACHABLE, "other-topic", cache_path=cache)
    reader = FakeReader()
    reader.add(PII)
    writer._install(reader)  # type: ignore[arg-type]
    watcher = RuleWatcher(UNREACHABLE, "rules", cache_path=cache, timeout_s=2)
    with pytest.raises(BrokerError):
        asyncio.run(watcher.prime())
