"""``betrace``: run workers, manage the local broker, produce load, read signals."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

import orjson
import typer

from betrace import __version__
from betrace.cli import archive as archive_cmd
from betrace.cli import audit as audit_cmd
from betrace.cli import bench as bench_cmd
from betrace.cli import demo as demo_cmd
from betrace.cli import dev as dev_cmd
from betrace.cli import importer as importer_cmd
from betrace.cli import integrity as integrity_cmd
from betrace.cli import lag as lag_cmd
from betrace.cli import query as query_cmd
from betrace.cli import receive as receive_cmd
from betrace.cli import rules as rules_cmd
from betrace.cli import runs as runs_cmd
from betrace.cli import serve as serve_cmd
from betrace.cli import storage as storage_cmd
from betrace.cli.common import STATE, fail_clearly, out, settings

app = typer.Typer(
    name="betrace",
    help=(
        "BeTrace checks that OpenTelemetry traces on Kafka behave as they must, and emits a "
        "signal for every rule violation.\n\n"
        "Quick start: 'betrace demo' starts a local broker and a worker, produces synthetic "
        "traces and compares the signals with the ground truth.\n\n"
        "Settings come from BETRACE_* environment variables or a TOML file (--config); "
        "see the README's configuration reference."
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
signals_app = typer.Typer(help="Read the signals (rule violations) BeTrace emits.", no_args_is_help=True)
app.add_typer(signals_app, name="signals")
app.add_typer(dev_cmd.app, name="dev")
app.add_typer(rules_cmd.app, name="rules")
app.command("demo")(demo_cmd.demo)
app.command("bench")(bench_cmd.bench)
app.command("lag")(lag_cmd.lag)
app.command("serve")(serve_cmd.serve)
app.command("receive")(receive_cmd.receive)
app.add_typer(serve_cmd.apikeys_app, name="apikeys")
app.add_typer(runs_cmd.app, name="runs")
app.add_typer(integrity_cmd.app, name="integrity")
app.command("import")(importer_cmd.import_command)
signals_app.command("count")(query_cmd.signals_count)
app.add_typer(archive_cmd.app, name="archive")
app.add_typer(storage_cmd.app, name="storage")
app.add_typer(audit_cmd.app, name="audit")


def _version(value: bool) -> None:
    if value:
        out.print(f"betrace {__version__}")
        raise typer.Exit


@app.callback()
def _root(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="TOML settings file (same keys as BETRACE_* without the prefix)."
        ),
    ] = None,
    log_level: Annotated[
        str | None, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    STATE.config = config
    STATE.log_level = log_level.upper() if log_level else None


@app.command()
def run(
    stages: Annotated[
        str | None,
        typer.Option(
            "--stages",
            help=(
                "all (default), ingest, or downstream. Run 'ingest' and 'downstream' in separate "
                "processes to give the per-span decode its own core (BETRACE_STAGES)."
            ),
        ),
    ] = None,
) -> None:
    """Start a worker: consume OTLP spans, evaluate rules, store spans, emit signals.

    Runs every stage (ingest, assemble, evaluate, sinks) as faust agents until
    SIGTERM or Ctrl-C. Fails at once on invalid settings, rules that do not
    parse, or an unreachable broker.
    """
    from betrace.agents.worker import run_worker  # faust import is slow; only `run` needs it

    cfg = settings(**({"stages": stages} if stages else {}))
    with fail_clearly():
        run_worker(cfg)


@app.command()
def produce(
    spans: Annotated[int, typer.Option("--spans", "-n", min=1, help="How many spans to produce.")] = 100_000,
    tenants: Annotated[
        str, typer.Option("--tenants", help="Comma-separated tenants, sent in the tenant header.")
    ] = "default,acme",
    violation_rate: Annotated[
        float,
        typer.Option(
            "--violation-rate",
            min=0.0,
            max=1.0,
            help="Share of checkout/profile traces that violate a demo rule.",
        ),
    ] = 0.05,
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives the same traces.")] = 7,
    spans_per_message: Annotated[int, typer.Option(min=1, help="Spans batched per Kafka message.")] = 200,
    by_trace_id: Annotated[
        bool,
        typer.Option(
            "--by-trace-id", help="One trace per message, keyed by trace id (partition_traces_by_id)."
        ),
    ] = False,
    topic: Annotated[str | None, typer.Option(help="Target topic (default: BETRACE_TOPICS__INPUT).")] = None,
    truth: Annotated[
        Path | None, typer.Option(help="Write the expected signals (tenant, rule, trace) as JSON lines here.")
    ] = None,
) -> None:
    """Produce realistic synthetic traces as OTLP protobuf, with a known share of violations.

    Example: betrace produce -n 100000 --tenants default,acme --violation-rate 0.1
    """
    from betrace.cli.progress import produce_with_progress
    from betrace.ingestion.runs import recorded_run

    cfg = settings()
    with fail_clearly(), recorded_run(cfg, "produce", topic or cfg.topics.input, actor="cli:produce") as run:
        stats, generator = produce_with_progress(
            cfg,
            spans=spans,
            tenants=tuple(t.strip() for t in tenants.split(",") if t.strip()),
            violation_rate=violation_rate,
            seed=seed,
            spans_per_message=spans_per_message,
            by_trace_id=by_trace_id,
            topic=topic,
        )
        run.counts.messages, run.counts.spans = stats.messages, stats.spans
    if truth is not None:
        with truth.open("wb") as fh:
            for tenant, rule, trace_id in sorted(generator.truth.expected):
                fh.write(orjson.dumps({"tenant": tenant, "rule_id": rule, "trace_id": trace_id}) + b"\n")
    out.print(
        f"produced {stats.spans:,} spans in {stats.messages:,} messages to "
        f"{topic or cfg.topics.input} in {stats.seconds:.1f}s ({stats.spans_per_s:,.0f} spans/s); "
        f"{len(generator.truth.expected):,} violations planted"
    )


@signals_app.command("tail")
def signals_tail(
    from_beginning: Annotated[
        bool, typer.Option("--from-beginning", help="Start at the oldest signal.")
    ] = False,
    count: Annotated[
        int | None, typer.Option("--count", "-n", min=1, help="Exit after this many signals.")
    ] = None,
    timeout: Annotated[float | None, typer.Option(help="Exit after this many seconds.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print each signal as one JSON line.")] = False,
) -> None:
    """Print signals as they arrive on the signals topic (Ctrl-C to stop)."""
    from betrace.api.signals import tail_signals

    cfg = settings()

    def show(doc: dict[str, object]) -> None:
        if as_json:
            sys.stdout.write(orjson.dumps(doc).decode() + "\n")
            sys.stdout.flush()
        else:
            out.print(
                f"{doc.get('detected_at')} [bold]{doc.get('severity')}[/] {doc.get('tenant')}/"
                f"{doc.get('rule_id')}@v{doc.get('rule_version')} trace={doc.get('trace_id')} "
                f"{doc.get('message')}",
                highlight=False,
            )

    with fail_clearly():
        asyncio.run(
            tail_signals(cfg, show, from_beginning=from_beginning, max_signals=count, timeout_s=timeout)
        )


def main() -> None:
    app()
