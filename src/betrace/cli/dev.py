"""``betrace dev``: the local Apache Kafka broker and Redis for development and tests."""

from __future__ import annotations

from typing import Annotated

import typer

from betrace.cli.common import console, fail_clearly, out, project_root
from betrace.dev.kafka import KafkaDevError, LocalKafka
from betrace.dev.redis import ENV_PORT as REDIS_PORT_ENV
from betrace.dev.redis import project_redis
from betrace.errors import DevEnvironmentError

app = typer.Typer(
    help=(
        "Manage a local Apache Kafka (KRaft) broker on 127.0.0.1, from the official jars "
        "fetched with Maven into .cache/kafka (data in .dev/kafka), and a local redis-server "
        f"(the cache tier; port ${REDIS_PORT_ENV}, default 16379, data in .dev/redis)."
    ),
    no_args_is_help=True,
)

Brokers = Annotated[int, typer.Option("--brokers", min=1, max=5, help="Nodes (3 for a replicated cluster).")]
NoRedis = Annotated[bool, typer.Option("--no-redis", help="Leave Redis alone (Kafka only).")]


def _kafka(brokers: int) -> LocalKafka:
    return LocalKafka(project_root(), brokers=brokers)


@app.command()
def up(brokers: Brokers = 1, no_redis: NoRedis = False) -> None:
    """Fetch Kafka if needed, format storage, start the broker and Redis, wait until both serve.

    Example: betrace dev up && export BETRACE_CACHE__URL=redis://127.0.0.1:16379/0
    """
    kafka = _kafka(brokers)
    with fail_clearly():
        try:
            console.print(
                f"starting Kafka {kafka.version} ({brokers} node(s)); the first run downloads the jars…"
            )
            kafka.up()
        except KafkaDevError as exc:
            raise DevEnvironmentError(str(exc)) from None
    out.print(f"Kafka is up: BETRACE_BROKERS={kafka.bootstrap_servers}")
    if not no_redis:
        server = project_redis(project_root())
        with fail_clearly():
            server.start()
        out.print(f"Redis is up: BETRACE_CACHE__URL={server.url}")


@app.command()
def down(
    brokers: Brokers = 1,
    no_redis: NoRedis = False,
    clean: Annotated[bool, typer.Option("--clean", help="Also delete the broker's data.")] = False,
) -> None:
    """Stop the local broker and Redis (and with --clean remove their data)."""
    kafka = _kafka(brokers)
    with fail_clearly():
        try:
            kafka.down(clean=clean)
        except KafkaDevError as exc:
            raise DevEnvironmentError(str(exc)) from None
    out.print("Kafka stopped" + (" and its data removed" if clean else ""))
    if not no_redis:
        server = project_redis(project_root())
        with fail_clearly():
            server.clean() if clean else server.stop()
        out.print("Redis stopped")


@app.command()
def status(brokers: Brokers = 1) -> None:
    """Show each local Kafka node and the local Redis: pid, port, running or not (exit 3: no node runs)."""
    kafka = _kafka(brokers)
    nodes = kafka.status()
    for node in nodes:
        state = "[green]running[/]" if node.running else "[red]stopped[/]"
        out.print(f"node {node.node_id}: {state} pid={node.pid or '-'} port={node.port} data={node.data_dir}")
    with fail_clearly():
        redis_status = project_redis(project_root()).status()
    state = "[green]running[/]" if redis_status.running else "[red]stopped[/]"
    out.print(
        f"redis: {state} pid={redis_status.pid or '-'} port={redis_status.port} data={redis_status.data_dir}"
    )
    if not any(n.running for n in nodes):
        raise typer.Exit(3)
