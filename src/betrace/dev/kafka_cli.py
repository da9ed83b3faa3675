"""The ``dev-kafka`` command line (``python -m betrace.dev.kafka``, scripts/dev-kafka.sh) over LocalKafka."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from betrace.dev._kafka_cluster import LocalKafka
from betrace.dev._kafka_config import (
    CONTROLLER_PORT_OFFSET,
    DEFAULT_HEAP_OPTS,
    DEFAULT_PORT,
    ENV_HEAP_OPTS,
    ENV_PORT,
    KAFKA_SCRIPTS,
    KAFKA_VERSION,
    KafkaDevError,
)

__all__ = ["main"]

# Deliberately the historical name (not __name__): log configuration and the
# "%(name)s" in log lines stay as they were before kafka.py was split up.
logger = logging.getLogger("betrace.dev.kafka")


def _default_root() -> Path:
    """The enclosing project (a parent with scripts/kafka/pom.xml), else cwd."""
    cwd = Path.cwd().resolve()
    for candidate in (cwd, *cwd.parents):
        if (candidate / KAFKA_SCRIPTS / "pom.xml").is_file():
            return candidate
    return cwd


def _recorded_cluster(root: Path) -> dict[str, int]:
    """Topology of the cluster last started under ``root`` (CLI defaults)."""
    try:
        data = json.loads((root / ".dev" / "kafka" / "cluster.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if k in ("brokers", "port") and isinstance(v, int)}


def _build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--brokers",
        type=int,
        default=None,
        metavar="N",
        help="number of nodes, each a combined KRaft broker+controller; 1 or 3 "
        "(default: as recorded in .dev/kafka/cluster.json, else 1)",
    )
    common.add_argument(
        "--port",
        type=int,
        default=None,
        help=f"client port of node 1; node i uses PORT+i-1, controllers PORT+"
        f"{CONTROLLER_PORT_OFFSET}+i-1 (default: ${ENV_PORT}, else as recorded in "
        f".dev/kafka/cluster.json, else {DEFAULT_PORT})",
    )
    common.add_argument(
        "--root",
        type=Path,
        default=None,
        help="project root holding .dev/ and .cache/ (default: the enclosing checkout)",
    )
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    parser = argparse.ArgumentParser(
        prog="dev-kafka",
        description=(
            f"Local Apache Kafka {KAFKA_VERSION} (KRaft) for development, tests and CI. "
            "Needs Java 17+ and, once, Maven (the jars are cached under "
            ".cache/kafka/). Data and logs live under .dev/kafka/. "
            "Run 'COMMAND --help' for a command's options."
        ),
        epilog=(
            f"Environment: {ENV_PORT} (client port), {ENV_HEAP_OPTS} (JVM heap, default "
            f"'{DEFAULT_HEAP_OPTS}'), JAVA_HOME. Example: scripts/dev-kafka.sh up "
            "--brokers 3"
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    up = sub.add_parser(
        "up", parents=[common], help="fetch jars if needed, start the cluster, wait until ready"
    )
    up.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for readiness (default: 90)")
    sub.add_parser("down", parents=[common], help="stop the cluster (data is kept)")
    sub.add_parser("clean", parents=[common], help="stop the cluster and delete .dev/kafka")
    sub.add_parser("status", parents=[common], help="show nodes, pids, ports")
    sub.add_parser("fetch", parents=[common], help="only download the Kafka jars (once)")
    describe = sub.add_parser(
        "describe-group",
        parents=[common],
        help="kafka-consumer-groups --describe --group GROUP (Kafka's own tool)",
    )
    describe.add_argument("group")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point (``python -m betrace.dev.kafka --help``)."""
    args = _build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    root = args.root if args.root is not None else _default_root()
    recorded = _recorded_cluster(root)
    brokers: int = args.brokers if args.brokers is not None else recorded.get("brokers", 1)
    port: int | None = args.port
    if port is None and not os.environ.get(ENV_PORT) and "port" in recorded:
        port = recorded["port"]
    error: KafkaDevError | None = None
    try:
        kafka = LocalKafka(root, brokers=brokers, port=port)
        command: str = args.command
        if command == "up":
            kafka.up(timeout=args.timeout)
            sys.stdout.write(f"{kafka.bootstrap_servers}\n")
        elif command == "down":
            kafka.down()
        elif command == "clean":
            kafka.down(clean=True)
        elif command == "fetch":
            sys.stdout.write(f"{kafka.fetch()}\n")
        elif command == "describe-group":
            sys.stdout.write(kafka.consumer_groups_describe(args.group))
        elif command == "status":
            rows = kafka.status()
            ready = kafka.is_ready(timeout=2.0) if all(r.running for r in rows) else False
            sys.stdout.write(f"bootstrap_servers={kafka.bootstrap_servers} ready={ready}\n")
            sys.stdout.write("node  pid      running  port   controller  data_dir\n")
            for row in rows:
                sys.stdout.write(
                    f"{row.node_id:<5} {row.pid or '-'!s:<8} {row.running!s:<8} {row.port:<6} "
                    f"{row.controller_port:<11} {row.data_dir}\n"
                )
            return 0 if ready else 3
    except KafkaDevError as exc:
        error = exc
    if error is not None:
        logger.error("%s", error)
        return 1
    return 0
