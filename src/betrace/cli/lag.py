"""``betrace lag``: committed offset, end offset and lag per partition of consumer groups."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Annotated, Any

import orjson
import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table

from betrace.cli.common import console, fail_clearly, out, settings
from betrace.config import Settings
from betrace.streams.lag import LagReader, PartitionLag


async def read_lag(cfg: Settings, groups: list[str]) -> dict[str, list[PartitionLag]]:
    """Lag of ``groups``, or of every group whose id starts with the app id."""
    reader = LagReader(cfg.brokers)
    await reader.start()
    try:
        names = groups or await reader.groups(prefix=cfg.app_id)
        return {g: await reader.lag(g) for g in names}
    finally:
        await reader.stop()


def as_json(result: dict[str, list[PartitionLag]]) -> dict[str, Any]:
    return {
        "groups": [
            {
                "group": group,
                "total_lag": sum(p.lag for p in parts),
                "partitions": [p.as_dict() for p in parts],
            }
            for group, parts in result.items()
        ]
    }


def render(result: dict[str, list[PartitionLag]], threshold: int) -> Group:
    tables = []
    for group, parts in result.items():
        total = sum(p.lag for p in parts)
        state = "[red]lagging[/]" if total > threshold else "[green]ok[/]"
        table = Table(title=f"{group}  total lag {total:,}  {state}", title_justify="left")
        for col in ("topic", "partition", "committed", "end", "lag"):
            table.add_column(col, justify="left" if col == "topic" else "right")
        for p in parts:
            table.add_row(
                p.topic,
                str(p.partition),
                "-" if p.committed is None else f"{p.committed:,}",
                f"{p.end:,}",
                f"{p.lag:,}",
            )
        tables.append(table)
    if not tables:
        return Group("no consumer groups found")
    return Group(*tables)


def lag(
    groups: Annotated[
        list[str] | None,
        typer.Argument(help="Groups to show (default: every group starting with BETRACE_APP_ID)."),
    ] = None,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option(min=0.2, help="Seconds between refreshes with --watch.")] = 2.0,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print JSON (for scripts) instead of tables.")
    ] = False,
) -> None:
    """Show consumer lag per group, topic and partition, with totals.

    The figures match Apache Kafka's `kafka-consumer-groups --describe`: LAG is
    the log-end offset minus the committed offset. A group is flagged as lagging
    above BETRACE_LAG_THRESHOLD records.

    Examples: `betrace lag`, `betrace lag my-group --json`, `betrace lag -w`.
    """
    cfg = settings()
    names = groups or []
    with fail_clearly():
        if not watch:
            result = asyncio.run(read_lag(cfg, names))
            if json_out:
                sys.stdout.write(orjson.dumps(as_json(result)).decode() + "\n")
            else:
                out.print(render(result, cfg.lag_threshold))
            return
        try:
            with Live(console=console if json_out else out, auto_refresh=False) as live:
                while True:
                    result = asyncio.run(read_lag(cfg, names))
                    if json_out:
                        sys.stdout.write(orjson.dumps(as_json(result)).decode() + "\n")
                        sys.stdout.flush()
                    else:
                        live.update(render(result, cfg.lag_threshold), refresh=True)
                    time.sleep(interval)
        except KeyboardInterrupt:
            return
