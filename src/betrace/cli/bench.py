"""``betrace bench``: run the load-test harness (``benchmarks/loadtest.py``) of a source checkout.

The harness lives with the other benchmarks, outside the installed package
(it needs the development extras for its plot), so this command finds it
under the project root and runs it with the same interpreter. Nothing here
imports matplotlib or the harness itself.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from betrace.cli.common import fail_clearly, project_root
from betrace.errors import BetraceError

HARNESS = Path("benchmarks") / "loadtest.py"


def bench(
    rate: Annotated[float, typer.Option(min=1, help="Target spans/s over all producers.")] = 50_000,
    duration: Annotated[float, typer.Option(min=1, help="Seconds of load.")] = 60,
    workers: Annotated[
        int, typer.Option(min=1, max=4, help="Worker processes in the consumer group (1, 2 or 4).")
    ] = 1,
    split_ingest: Annotated[
        bool,
        typer.Option(
            "--split-ingest", help="Workers run the downstream stages; ingest runs in its own processes."
        ),
    ] = False,
    ingest_workers: Annotated[int, typer.Option(min=1, help="Ingest processes with --split-ingest.")] = 1,
    producers: Annotated[int, typer.Option(min=1, help="Producer processes generating the load.")] = 2,
    tenants: Annotated[int, typer.Option(min=1, help="Tenants, each with its own rule file.")] = 10,
    rules_per_tenant: Annotated[int, typer.Option(min=2, max=20, help="Rules per tenant.")] = 20,
    root_close_delay: Annotated[
        float,
        typer.Option(
            min=0,
            help="Seconds without a span that close a trace once its root arrived (0: idle timeout only).",
        ),
    ] = 0.0,
    partitions: Annotated[
        int | None, typer.Option(min=1, help="Partitions per topic (default: max(4, workers)).")
    ] = None,
    brokers: Annotated[
        str | None, typer.Option(help="Use this Kafka cluster instead of starting the local broker.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Directory for result.json and loadtest.png (default .dev/loadtest/).")
    ] = None,
    py_spy: Annotated[
        Path | None, typer.Option("--py-spy", help="Also record a py-spy flame graph of worker w0 (SVG).")
    ] = None,
    smoke: Annotated[
        bool, typer.Option("--smoke", help="A few seconds at a low rate, no timing checks (what CI runs).")
    ] = False,
) -> None:
    """Load-test the whole pipeline at a target rate and check exactly-once at the end.

    Producer processes send synthetic OTLP traces (with known violations) at
    RATE spans/s for DURATION seconds to a real broker; worker processes run
    the pipeline with 20 rules per tenant. Every second the harness samples
    throughput, consumer lag, worker RSS/CPU, produce-to-signal latency and
    rule-evaluation time; at the end it checks stored spans and signals
    against the ground truth and writes result.json and a PNG plot (the plot
    needs matplotlib from the dev extras; without it the plot is skipped).

    Needs a BeTrace source checkout (it runs benchmarks/loadtest.py).

    Examples:

      betrace bench --smoke

      betrace bench --rate 50000 --duration 60 --workers 1

      betrace bench --rate 80000 --duration 300 --workers 2 --split-ingest
    """
    if workers not in (1, 2, 4):
        msg = "--workers must be 1, 2 or 4"
        raise typer.BadParameter(msg, param_hint="--workers")
    root = project_root()
    script = root / HARNESS
    with fail_clearly():
        if not script.is_file():
            msg = (
                f"{HARNESS} not found under {root}: 'betrace bench' runs the harness of a BeTrace "
                "source checkout; run it from inside one"
            )
            raise BetraceError(msg)
    argv = [sys.executable, str(script), "--rate", str(rate), "--duration", str(duration)]
    argv += ["--workers", str(workers), "--producers", str(producers), "--tenants", str(tenants)]
    argv += ["--rules-per-tenant", str(rules_per_tenant)]
    if root_close_delay:
        argv += ["--root-close-delay", str(root_close_delay)]
    if split_ingest:
        argv += ["--split-ingest", "--ingest-workers", str(ingest_workers)]
    if partitions is not None:
        argv += ["--partitions", str(partitions)]
    if brokers:
        argv += ["--brokers", brokers]
    if out is not None:
        argv += ["--out", str(out)]
    if py_spy is not None:
        argv += ["--py-spy", str(py_spy)]
    if smoke:
        argv.append("--smoke")
    try:
        code = subprocess.run(argv, cwd=root, check=False).returncode
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    raise typer.Exit(code)
