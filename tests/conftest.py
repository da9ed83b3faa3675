"""Shared fixtures: one real Kafka broker per test session, unique topics per test."""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from betrace.cli.demo import demo_settings
from betrace.config import Settings, load_settings
from betrace.dev.kafka import LocalKafka
from betrace.streams.admin import ensure_topics

ROOT = Path(__file__).resolve().parents[1]
TEST_KAFKA_PORT = int(os.environ.get("BETRACE_TEST_KAFKA_PORT", "19392"))


@pytest.fixture(scope="session")
def local_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka | None]:
    """The repo's own Apache Kafka broker, or None when ``BETRACE_TEST_BROKERS`` is set.

    ``BETRACE_TEST_BROKERS`` points the suite at an existing cluster (for
    example one started by testcontainers where Docker exists); otherwise
    LocalKafka starts Apache Kafka from the Maven jars.
    """
    if os.environ.get("BETRACE_TEST_BROKERS"):
        yield None
        return
    kafka = LocalKafka(
        tmp_path_factory.mktemp("kafka"),
        port=TEST_KAFKA_PORT,
        cache_dir=ROOT / ".cache" / "kafka",
        pom=ROOT / "scripts" / "kafka" / "pom.xml",
    )
    kafka.up()
    try:
        yield kafka
    finally:
        kafka.down(clean=True)


@pytest.fixture(scope="session")
def kafka_brokers(local_kafka: LocalKafka | None) -> str:
    """Bootstrap servers of the real broker the integration tests use."""
    if local_kafka is None:
        return os.environ["BETRACE_TEST_BROKERS"]
    return local_kafka.bootstrap_servers


@pytest.fixture
def pipeline_settings(kafka_brokers: str, tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    """Settings with this test's own topics, consumer group and data directory."""
    name = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[:40]
    run_id = f"{name}-{uuid.uuid4().hex[:8]}"
    base = load_settings(brokers=kafka_brokers, rules_dir=ROOT / "config" / "rules")
    cfg = demo_settings(base, run_id, tmp_path / "data", idle_timeout_s=1.0)
    asyncio.run(ensure_topics(cfg))
    return cfg
