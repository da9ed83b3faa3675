"""The rules topic on the real broker: hot reload, disable, restart, and the CLI."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import orjson
import pyarrow as pa
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from typer.testing import CliRunner

from betrace.agents.evaluate import EvaluateStage
from betrace.cli.main import app
from betrace.config import Settings
from betrace.errors import ConfigError
from betrace.metrics import InMemoryHooks
from betrace.rules.model import Rule
from betrace.rules.registry import RegistryState, RuleVersion, propose, set_enabled
from betrace.rules.store import commit, ensure_rules_topic, read_state
from betrace.rules.watcher import RuleWatcher
from betrace.streams.schemas import SPAN_SCHEMA

SWITCH_S = 5.0
PII = Rule(id="pii-audit", tenant="acme", name="PII", expression="when { pii.access } always { audit.log }")
UNAUDITED, AUDITED = "a" * 32, "b" * 32


def traces() -> pa.Table:
    spans = [(UNAUDITED, "1", "pii.access"), (AUDITED, "2", "pii.access"), (AUDITED, "3", "audit.log")]
    rows = [
        {
            "tenant": "acme", "trace_id": t, "span_id": s.zfill(16), "parent_span_id": None, "name": n,
            "service": "svc", "kind": 1, "status_code": 0, "start_ns": 1, "end_ns": 2,
            "attributes": "{}", "resource_attributes": "{}", "produced_ms": 0,
        }
        for t, s, n in spans
    ]  # fmt: skip
    return pa.Table.from_pylist(rows, schema=SPAN_SCHEMA)


async def change(brokers: str, topic: str, make: Callable[[RegistryState], RuleVersion | None]) -> float:
    """Publish one change; return the monotonic time it was acknowledged."""

    def one(state: RegistryState) -> list[RuleVersion]:
        version = make(state)
        return [] if version is None else [version]

    await commit(brokers, topic, one)
    return time.monotonic()


async def until(check: Callable[[], bool], since: float) -> float:
    while not check():
        assert time.monotonic() - since < SWITCH_S, "change not picked up in time"
        await asyncio.sleep(0.05)
    return time.monotonic() - since


def versions(watcher: RuleWatcher) -> list[int]:
    return [c.rule.version for c in watcher.current().for_tenant("acme")]


def test_hot_reload_disable_and_restart(kafka_brokers: str, tmp_path: Path) -> None:
    topic = f"test.rules.{uuid.uuid4().hex[:8]}"
    cache = tmp_path / "rules.json"

    async def scenario() -> None:
        watcher = RuleWatcher(kafka_brokers, topic, cache_path=cache, poll_ms=200)
        await watcher.start()
        stage = EvaluateStage(watcher, InMemoryHooks())
        try:
            assert stage.evaluate(traces()) == []
            since = await change(kafka_brokers, topic, lambda s: propose(s, PII, author="ana", reason="v1"))
            await until(lambda: versions(watcher) == [1], since)
            [doc] = stage.evaluate(traces())
            assert (doc["trace_id"], doc["rule_version"]) == (UNAUDITED, 1)

            v2 = replace(PII, expression="when { pii.access } never { audit.log }", severity="high")
            since = await change(kafka_brokers, topic, lambda s: propose(s, v2, author="bob", reason="v2"))
            await until(lambda: versions(watcher) == [2], since)
            [doc] = stage.evaluate(traces())
            assert (doc["trace_id"], doc["rule_version"], doc["severity"]) == (AUDITED, 2, "high")

            since = await change(
                kafka_brokers,
                topic,
                lambda s: set_enabled(s, "acme", "pii-audit", enabled=False, author="ana", reason="off"),
            )
            await until(lambda: versions(watcher) == [], since)
            assert stage.evaluate(traces()) == []
        finally:
            await watcher.stop()

        # A new component rebuilds everything from the compacted topic alone.
        restarted = RuleWatcher(kafka_brokers, topic, cache_path=None)
        await restarted.prime()
        assert versions(restarted) == []
        history = restarted.state.history("acme", "pii-audit")
        assert [(v.rule.version, v.rule.enabled, v.author) for v in history] == [
            (1, True, "ana"), (2, True, "bob"), (3, False, "ana"),
        ]  # fmt: skip
        assert await topic_policy(kafka_brokers, topic) == "compact"

        # The local copy written while following lets a worker start without the broker.
        offline = RuleWatcher("127.0.0.1:1", topic, cache_path=cache, timeout_s=2)
        await offline.prime()
        assert [v.rule.version for v in offline.state.history("acme", "pii-audit")] == [1, 2, 3]

    asyncio.run(scenario())


def test_seed_publishes_only_missing_rules(kafka_brokers: str) -> None:
    topic = f"test.rules.{uuid.uuid4().hex[:8]}"
    other = replace(PII, id="fraud", expression="when { charge } always { check }")

    async def scenario() -> None:
        await change(
            kafka_brokers, topic, lambda s: propose(s, replace(PII, severity="low"), author="a", reason="r")
        )
        first = RuleWatcher(kafka_brokers, topic, seed=[PII, other])
        await first.prime()
        second = RuleWatcher(kafka_brokers, topic, seed=[PII, other])  # a second worker: nothing more
        await second.prime()
        state = await read_state(kafka_brokers, topic)
        assert [(v.rule.id, v.rule.version, v.rule.severity) for v in state.latest_all()] == [
            ("fraud", 1, "medium"), ("pii-audit", 1, "low"),
        ]  # fmt: skip
        assert [v.author for v in state.latest_all()] == ["betrace-seed", "a"]

    asyncio.run(scenario())


def test_a_rules_topic_without_compaction_is_refused(kafka_brokers: str) -> None:
    topic = f"test.rules.{uuid.uuid4().hex[:8]}"

    async def scenario() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_brokers)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, 1, 1)])  # the broker default: cleanup.policy=delete
        finally:
            await admin.close()
        with pytest.raises(ConfigError, match=r"cleanup\.policy=delete"):
            await ensure_rules_topic(kafka_brokers, topic)

    asyncio.run(scenario())


async def topic_policy(brokers: str, topic: str) -> str:
    admin = AIOKafkaAdminClient(bootstrap_servers=brokers)
    await admin.start()
    try:
        [response] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
        entries = {e[0]: e[1] for e in response.resources[0][4]}
        return str(entries["cleanup.policy"])
    finally:
        await admin.close()


def test_cli_round_trip(kafka_brokers: str, tmp_path: Path, pipeline_settings: Settings) -> None:
    topic = f"test.rules.{uuid.uuid4().hex[:8]}"
    env = {"BETRACE_BROKERS": kafka_brokers, "BETRACE_AUTHOR": "cli-test", "NO_COLOR": "1", "COLUMNS": "200"}
    runner = CliRunner()

    def run(*args: str) -> tuple[int, str]:
        result = runner.invoke(app, ["rules", "--topic", topic, *args], env=env)
        assert "Traceback" not in result.output
        return result.exit_code, result.output

    code, output = run("add", "--tenant", "acme", "--id", "x", "-e", "when { a.where(n > }", "--reason", "r")
    assert code == 1
    assert "line 1, column" in output
    assert "^" in output
    code, output = run(
        "add", "--tenant", "acme", "--id", "x", "-e", "when { a } always { b }", "--reason", "new"
    )
    assert (code, output.strip()) == (0, "published acme/x@v1")
    code, output = run("add", "--tenant", "acme", "--id", "x", "--severity", "critical", "--reason", "worse")
    assert (code, output.strip()) == (0, "published acme/x@v2")
    code, output = run("add", "--tenant", "acme", "--id", "x", "--severity", "critical", "--reason", "again")
    assert code == 0
    assert "unchanged" in output
    code, output = run("disable", "acme/x", "--reason", "noisy")
    assert (code, output.strip()) == (0, "disabled acme/x: v3")
    code, output = run("list", "--json")
    assert (code, orjson.loads(output)) == (0, [])
    code, output = run("list", "--all", "--json")
    [doc] = orjson.loads(output)
    assert (doc["version"], doc["enabled"], doc["severity"], doc["author"]) == (
        3,
        False,
        "critical",
        "cli-test",
    )
    code, output = run("history", "acme/x", "--json")
    assert [(d["version"], d["reason"]) for d in orjson.loads(output)] == [
        (1, "new"),
        (2, "worse"),
        (3, "noisy"),
    ]
    code, output = run("show", "acme/x", "--version", "1", "--json")
    assert orjson.loads(output)["severity"] == "medium"
    code, output = run("show", "acme/nope")
    assert code == 1
    assert "no rule acme/nope" in output
    code, output = run("add", "--file", str(Path(__file__).parents[3] / "config" / "rules" / "acme.yaml"))
    assert code == 0
    assert "published acme/pii-audit@v1" in output
    trace = tmp_path / "trace.json"
    trace.write_bytes(orjson.dumps(otlp_json()))
    code, output = run("test", "acme/pii-audit", "--trace", str(trace))
    assert code == 0, output
    assert f"trace {'c' * 32}: VIOLATION" in output
    del pipeline_settings  # only for the broker and an isolated data dir


def otlp_json() -> dict[str, object]:
    span = {"traceId": "c" * 32, "spanId": "1" * 16, "name": "pii.access", "kind": 1,
            "startTimeUnixNano": "1000", "endTimeUnixNano": "2000"}  # fmt: skip
    return {"resourceSpans": [{"resource": {"attributes": []}, "scopeSpans": [{"spans": [span]}]}]}
