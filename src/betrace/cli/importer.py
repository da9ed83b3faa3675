"""``betrace import FILE``: OTLP/JSON files onto the input topic, as one ingestion run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from betrace.cli.common import console, fail_clearly, out, settings
from betrace.ingestion.importer import ImportOptions, import_file


def import_command(
    file: Annotated[
        Path,
        typer.Argument(
            help="OTLP/JSON: one ExportTraceServiceRequest per line, or one request document.",
            show_default=False,
        ),
    ],
    rate: Annotated[
        float | None,
        typer.Option(
            min=0, help="At most this many spans/s (default BETRACE_INTEGRITY__IMPORT_RATE; 0: unlimited)."
        ),
    ] = None,
    tenant: Annotated[
        str | None,
        typer.Option(
            help="Send this tenant in the tenant header (default: resource tenant.id, else default)."
        ),
    ] = None,
    topic: Annotated[str | None, typer.Option(help="Target topic (default: BETRACE_TOPICS__INPUT).")] = None,
    retries: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Retries of a transient broker error, with backoff "
            "(default BETRACE_INTEGRITY__IMPORT_RETRIES).",
        ),
    ] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Stop at the first malformed line.")] = False,
) -> None:
    """Import OTLP/JSON trace files through the normal ingest path, as one ingestion run.

    Every request is validated first: a malformed line is reported with its line
    number and reason, counted as a failure of the run, and skipped (or, with
    --strict, ends the import). Importing the same file twice changes no stored
    count: spans are upserted by (trace_id, span_id).

    Examples:

      betrace import traces.jsonl

      betrace import export.json --tenant acme --rate 20000

      betrace runs show <run id printed at the end>
    """
    cfg = settings()
    options = ImportOptions(
        topic=topic,
        tenant=tenant,
        rate=cfg.integrity.import_rate if rate is None else rate,
        retries=cfg.integrity.import_retries if retries is None else retries,
        strict=strict,
    )
    size = file.stat().st_size if file.is_file() else 0
    with (
        fail_clearly(),
        Progress(
            TextColumn("importing"),
            BarColumn(),
            DownloadColumn(),
            TextColumn("{task.fields[spans]:,} spans"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        ) as progress,
    ):
        task = progress.add_task("import", total=size or None, spans=0)

        def advance(read: int, spans: int) -> None:
            progress.update(task, completed=read, spans=spans)

        run, importer = import_file(cfg, file, options, on_progress=advance)
    counts = run.counts
    out.print(
        f"imported {counts.spans:,} spans in {counts.messages:,} requests from {file} to "
        f"{topic or cfg.topics.input}; {counts.failures:,} failures; {importer.retries_used} retries; "
        f"run {run.run_id}",
        highlight=False,
    )
    for reason, n in sorted(counts.failure_reasons.items()):
        out.print(f"  {reason}: {n:,} (e.g. {next((s for s in counts.failure_samples if reason in s), '')})")
    if counts.failures:
        # 4: finished, but some lines were skipped (scripts can tell it from a clean import).
        raise typer.Exit(4 if counts.messages else 1)
