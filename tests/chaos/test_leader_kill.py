"""Scenario 3: three brokers (KRaft), replication factor 3, acks=all, min.insync.replicas=2:
SIGKILL the leader of the input topic's first partition while load flows.

Ports 20100-20102 (controllers 21100-21102), apart from the session broker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from betrace.dev.kafka import LocalKafka
from tests.chaos.harness import ROOT, ChaosRun, chaos_settings, fault_seconds

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.integration]

PORT = 20100


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalKafka]:
    kafka = LocalKafka(
        tmp_path / "kafka",
        brokers=3,
        port=PORT,
        cache_dir=ROOT / ".cache" / "kafka",
        pom=ROOT / "scripts" / "kafka" / "pom.xml",
    )
    kafka.up(timeout=150)
    try:
        yield kafka
    finally:
        kafka.down(clean=True)


def _set_cluster_min_isr(kafka: LocalKafka, value: int) -> None:
    """The cluster-wide default (``--entity-default``), so BeTrace's and faust's topics all get it."""
    proc = kafka.run_tool(
        "kafka.admin.ConfigCommand",
        [
            "--bootstrap-server",
            kafka.bootstrap_servers,
            "--entity-type",
            "brokers",
            "--entity-default",
            "--alter",
            "--add-config",
            f"min.insync.replicas={value}",
        ],
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


async def _topic_min_isr_and_leader(brokers: str, topic: str) -> tuple[str, int, int]:
    """The topic's min ISR, partition 0's leader and replica count, once every broker knows them.

    A topic created a moment ago may be missing from the answering broker's metadata
    (seen once in CI), so the lookup is repeated for up to 15 s.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=brokers)
    await admin.start()
    deadline = time.monotonic() + 15
    try:
        while True:
            described = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
            resource = described[0].to_object()["resources"][0]
            entries = resource.get("config_entries") or resource.get("configs") or []
            min_isr = [
                e["config_value"]
                for e in entries
                if (e.get("config_names") or e.get("config_name")) == "min.insync.replicas"
            ]
            meta = await admin.describe_topics([topic])
            partitions = [p for p in meta[0].get("partitions") or [] if p["partition"] == 0]
            if min_isr and partitions and partitions[0]["leader"] >= 0:
                return min_isr[0], int(partitions[0]["leader"]), len(partitions[0]["replicas"])
            if time.monotonic() > deadline:
                msg = f"{topic}: no min.insync.replicas or partition 0 leader in the metadata after 15 s"
                raise AssertionError(msg)
            await asyncio.sleep(0.5)
    finally:
        await admin.close()


def test_killing_the_partition_leader_loses_and_duplicates_nothing(
    cluster: LocalKafka, tmp_path: Path
) -> None:
    _set_cluster_min_isr(cluster, 2)
    cfg = chaos_settings(cluster.bootstrap_servers, tmp_path, "leader-kill", replication_factor=3)
    min_isr, leader, replicas = asyncio.run(_topic_min_isr_and_leader(cfg.brokers, cfg.topics.input))
    assert (min_isr, replicas) == ("2", 3)
    run = ChaosRun(
        "3. partition leader SIGKILL (3 brokers, RF 3, min ISR 2)", cfg, tmp_path, spans=3_000, seed=303
    )
    run.start_worker()
    run.load_in_background(chunks=12)  # the workload producer uses acks=all
    time.sleep(1.5)
    run.fault_begins(f"SIGKILL of broker {leader} of 3, leader of the input topic's partition 0; stays down")
    cluster.kill_node(leader)
    run.fault_ends()  # nothing repairs it: recovery is the cluster's own leader election
    time.sleep(fault_seconds(1.0))
    run.notes.append(f"killed node {leader} of 3")
    run.finish(drain_timeout_s=240)
