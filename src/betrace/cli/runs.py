"""``betrace runs``: the ingestion runs recorded in ``<data_dir>/runs.duckdb``."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import orjson
import typer
from rich.markup import escape
from rich.table import Table

from betrace.cli.common import fail_clearly, out, settings
from betrace.errors import BetraceError
from betrace.ingestion.runs import KINDS, RUN_STATES, RunStore

app = typer.Typer(
    help=(
        "Ingestion runs: every worker session, 'betrace produce' and 'betrace import' is a run with "
        "its start and end, messages and spans seen, duplicates skipped, dead letters, spans stored "
        "or updated, and failures with reasons. A worker updates its row every few seconds "
        "(BETRACE_INTEGRITY__RUN_CHECKPOINT_S); a running row that stopped updating is 'stale' "
        "(its process died).\n\n"
        "Examples:\n\n"
        "  betrace runs list\n\n"
        "  betrace runs list --kind import --state failed\n\n"
        "  betrace runs show import-20261125T050102Z-1a2b3c4d --json"
    ),
    no_args_is_help=True,
)


class UnknownRunError(BetraceError):
    """No run has the given id."""


def _n(value: Any) -> str:
    return "-" if value is None else f"{value:,}"


@app.command("list")
def list_runs(
    kind: Annotated[str | None, typer.Option(help=f"Only runs of this kind: {', '.join(KINDS)}.")] = None,
    state: Annotated[
        str | None,
        typer.Option(help="Only runs in this state: running, stale, finished, failed, interrupted."),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="Newest first, at most this many.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document per line.")] = False,
) -> None:
    """List ingestion runs, newest first. A '-' count was not seen by that run's process."""
    cfg = settings()
    with fail_clearly():
        if kind is not None and kind not in KINDS:
            msg = f"--kind must be one of {', '.join(KINDS)}, got {kind!r}"
            raise UnknownRunError(msg)
        if state is not None and state not in RUN_STATES:
            msg = f"--state must be one of {', '.join(RUN_STATES)}, got {state!r}"
            raise UnknownRunError(msg)
        rows = RunStore(cfg.data_dir).list(kind=kind, state=state, limit=limit)
    if as_json:
        for row in rows:
            sys.stdout.write(orjson.dumps(row).decode() + "\n")
        return
    if not rows:
        out.print(f"no ingestion runs recorded in {cfg.data_dir} yet")
        return
    table = Table(title=f"ingestion runs ({cfg.data_dir})", title_justify="left")
    table.add_column("run id", no_wrap=True)  # the handle for 'runs show': never cut
    for column in ("kind", "state", "started", "finished", "messages", "spans", "dup", "dlq"):
        table.add_column(column, justify="right" if column in ("messages", "spans", "dup", "dlq") else "left")
    for column in ("stored", "updated", "failures"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            r["run_id"],
            r["kind"],
            r["state"],
            r["started_at"],
            r["finished_at"] or "-",
            _n(r["messages"]),
            _n(r["spans"]),
            _n(r["duplicates"]),
            _n(r["dead_lettered"]),
            _n(r["stored"]),
            _n(r["updated"]),
            _n(r["failures"]),
        )
    out.print(table)


@app.command("show")
def show_run(
    run_id: Annotated[str, typer.Argument(help="A run id from 'betrace runs list'.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the run as JSON.")] = False,
) -> None:
    """Everything recorded about one run, including its failure reasons and where they happened."""
    cfg = settings()
    with fail_clearly():
        row = RunStore(cfg.data_dir).get(run_id)
        if row is None:
            msg = f"no ingestion run {run_id!r} in {cfg.data_dir} (see 'betrace runs list')"
            raise UnknownRunError(msg)
    if as_json:
        sys.stdout.write(orjson.dumps(row, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    for name in (
        "run_id", "kind", "state", "source", "host", "pid", "started_at", "updated_at", "finished_at",
        "messages", "spans", "duplicates", "dead_lettered", "stored", "updated", "failures",
        "checkpoints", "note",
    ):  # fmt: skip
        value = row.get(name)
        shown = _n(value) if isinstance(value, int) or value is None else str(value)
        out.print(f"[bold]{name:>14}[/] {escape(shown)}", highlight=False)
    if row["failure_reasons"]:
        out.print("[bold]failure reasons[/]")
        for reason, count in sorted(row["failure_reasons"].items(), key=lambda kv: -kv[1]):
            out.print(f"  {count:>8,}  {escape(reason)}", highlight=False)
        out.print("[bold]latest failures[/]")
        for sample in row["failure_samples"]:
            out.print(f"  {escape(sample)}", highlight=False)
