"""Local Apache Kafka (KRaft) cluster for developers, tests and CI.

Needs only Java 17+ and Maven on the machine: the official Apache Kafka jars
are fetched once from Maven Central with ``scripts/kafka/pom.xml`` into
``<root>/.cache/kafka/<version>/libs`` and the nodes are started straight from
that class path (``java -cp 'libs/*' kafka.Kafka server.properties``).

Layout (``root`` is the project root)::

    .cache/kafka/<version>/libs/        jar cache (safe to keep across cleans)
    .dev/kafka/cluster.json             cluster id + topology, reused on restart
    .dev/kafka/node-<id>/server.properties
    .dev/kafka/node-<id>/data/          log.dirs (KRaft metadata + topic data)
    .dev/kafka/node-<id>/logs/server.log  broker log (log4j2)
    .dev/kafka/node-<id>/kafka.out      JVM stdout/stderr
    .dev/kafka/node-<id>/kafka.pid
    .dev/kafka/tools/tools.log          log of Kafka CLI tools run from here
    .dev/kafka.lock                     serialises up/down between processes

Each node runs in KRaft combined mode (``process.roles=broker,controller``)
with a static controller quorum, so ``brokers=3`` gives a 3-voter quorum of 3
brokers on consecutive ports. Client ports are ``port .. port+brokers-1``;
controller ports are ``controller_port ..`` (default ``port + 1000``).

From a shell: ``scripts/dev-kafka.sh up|down|status|clean [--brokers N]``.
From Python::

    kafka = LocalKafka(Path("."))
    kafka.up()
    ...  # use kafka.bootstrap_servers
    kafka.down()

All methods are synchronous and block; from async code call them through
``asyncio.to_thread``.

This module is the public entry point; the code lives in ``_kafka_cluster``
(LocalKafka), ``_kafka_config``, ``_kafka_proc``, ``_kafka_probe``,
``_kafka_tools`` and ``kafka_cli`` (the command line).
"""

from __future__ import annotations

import logging

from betrace.dev import _kafka_config
from betrace.dev._kafka_cluster import LocalKafka
from betrace.dev._kafka_config import (
    DEFAULT_HEAP_OPTS,
    DEFAULT_PORT,
    ENV_HEAP_OPTS,
    ENV_PORT,
    KAFKA_VERSION,
    KafkaDevError,
    MissingToolError,
    NodeStatus,
)
from betrace.dev.kafka_cli import main

__all__ = [
    "DEFAULT_HEAP_OPTS",
    "DEFAULT_PORT",
    "ENV_HEAP_OPTS",
    "ENV_PORT",
    "KAFKA_VERSION",
    "KafkaDevError",
    "LocalKafka",
    "MissingToolError",
    "NodeStatus",
    "main",
]

# Public names importable from here before the split, though not in __all__.
CONTROLLER_PORT_OFFSET = _kafka_config.CONTROLLER_PORT_OFFSET
MIN_JAVA_MAJOR = _kafka_config.MIN_JAVA_MAJOR
QUORUM_LOSS_GRACE = _kafka_config.QUORUM_LOSS_GRACE
logger = logging.getLogger(__name__)

if __name__ == "__main__":
    raise SystemExit(main())
