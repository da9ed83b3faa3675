"""Scenario 2: the (single) broker stops and starts again while load flows.

The session broker is shared by every test, so this one starts its own on
port 20110 (controller 21110).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from betrace.dev.kafka import LocalKafka
from tests.chaos.harness import ROOT, ChaosRun, chaos_settings, fault_seconds

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.integration]

PORT = 20110


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[LocalKafka]:
    kafka = LocalKafka(
        tmp_path / "kafka",
        port=PORT,
        cache_dir=ROOT / ".cache" / "kafka",
        pom=ROOT / "scripts" / "kafka" / "pom.xml",
    )
    kafka.up()
    try:
        yield kafka
    finally:
        kafka.down(clean=True)


def test_broker_restart_loses_and_duplicates_nothing(own_broker: LocalKafka, tmp_path: Path) -> None:
    cfg = chaos_settings(own_broker.bootstrap_servers, tmp_path, "broker-restart")
    run = ChaosRun("2. broker restart", cfg, tmp_path, spans=3_000, seed=202)
    run.start_worker()
    run.load_in_background(chunks=12)
    time.sleep(1.5)  # mid-load
    down_for = fault_seconds(3.0)
    run.fault_begins(f"broker stopped (SIGTERM) for {down_for:.0f}s, then started")
    own_broker.stop_node(1)
    time.sleep(down_for)
    own_broker.start_node(1)
    run.fault_ends()
    result = run.finish()
    assert result.detect_s is not None, "nothing noticed the broker was down"
