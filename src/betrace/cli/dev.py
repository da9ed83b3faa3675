"""``betrace dev``: the local Apache Kafka broker for development and tests."""

from __future__ import annotations

from typing import Annotated

import typer

from betrace.cli.common import console, fail_clearly, out, project_root
from betrace.dev.kafka import KafkaDevError, LocalKafka
from betrace.errors import DevEnvironmentError

app = typer.Typer(
    help=(
        "Manage a local Apache Kafka (KRaft) broker on 127.0.0.1, from the official jars "
        "fetched with Maven into .cache/kafka (data in .dev/kafka)."
    ),
    no_args_is_help=True,
)

Brokers = Annotated[int, typer.Option("--brokers", min=1, max=5, help="Nodes (3 for a replicated cluster).")]


def _kafka(brokers: int) -> LocalKafka:
    return LocalKafka(project_root(), brokers=brokers)


@app.command()
def up(brokers: Brokers = 1) -> None:
    """Fetch Kafka if needed, format storage, start the broker and wait until it serves."""
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


@app.command()
def down(
    brokers: Brokers = 1,
    clean: Annotated[bool, typer.Option("--clean", help="Also delete the broker's data.")] = False,
) -> None:
    """Stop the local broker (and with --clean remove its data)."""
    kafka = _kafka(brokers)
    with fail_clearly():
        try:
            kafka.down(clean=clean)
        except KafkaDevError as exc:
            raise DevEnvironmentError(str(exc)) from None
    out.print("Kafka stopped" + (" and its data removed" if clean else ""))


@app.command()
def status(brokers: Brokers = 1) -> None:
    """Show each local node: pid, port, running or not."""
    kafka = _kafka(brokers)
    nodes = kafka.status()
    for node in nodes:
        state = "[green]running[/]" if node.running else "[red]stopped[/]"
        out.print(f"node {node.node_id}: {state} pid={node.pid or '-'} port={node.port} data={node.data_dir}")
    if not any(n.running for n in nodes):
        raise typer.Exit(3)
