"""Producing synthetic load with a progress bar."""

from __future__ import annotations

import asyncio

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from betrace.cli.common import console
from betrace.config import Settings
from betrace.workload.generator import TraceGenerator
from betrace.workload.otlp import batch_messages
from betrace.workload.producer import ProduceStats, produce


def produce_with_progress(
    settings: Settings,
    *,
    spans: int,
    tenants: tuple[str, ...],
    violation_rate: float,
    seed: int,
    spans_per_message: int = 200,
    by_trace_id: bool = False,
    topic: str | None = None,
) -> tuple[ProduceStats, TraceGenerator]:
    generator = TraceGenerator(tenants=tenants, violation_rate=violation_rate, seed=seed)
    messages = batch_messages(
        generator.traces(spans), spans_per_message=spans_per_message, by_trace_id=by_trace_id
    )
    with Progress(
        TextColumn("producing spans"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("produce", total=spans)
        stats = asyncio.run(
            produce(settings, messages, topic=topic, on_progress=lambda n: progress.advance(task, n))
        )
        progress.update(task, completed=stats.spans, total=stats.spans)
    return stats, generator
