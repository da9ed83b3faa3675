"""A worker session as an ingestion run: counters from the stages this process runs.

The ingest stage contributes messages, spans, duplicates, dead letters and
failures; the span store sink (downstream) contributes stored and updated
spans. In a split deployment the ingest worker's run has ``stored = NULL`` and
the downstream worker's run has ``messages = spans = 0`` with ``duplicates``
and ``dead_lettered`` NULL: each row says only what its process saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from betrace.audit import AuditRecorder
from betrace.ingestion.audit import recorder_for
from betrace.ingestion.runs import IngestionRun

if TYPE_CHECKING:
    from betrace.agents.app import Pipeline
    from betrace.config import Settings

logger = logging.getLogger(__name__)


def collect(pipeline: Pipeline, run: IngestionRun) -> None:
    """Copy the stages' running totals into the run's counters."""
    counts = run.counts
    if pipeline.upstream:
        totals = pipeline.ingest.totals
        counts.messages = totals.messages
        counts.spans = totals.spans
        counts.duplicates = totals.duplicates
        counts.dead_lettered = totals.dead_letters
        counts.failure_reasons = dict(totals.reasons)
        counts.failure_samples = list(totals.samples)
    if pipeline.downstream:
        counts.stored = pipeline.span_sink.stored
        counts.updated = pipeline.span_sink.updated


def worker_run(
    pipeline: Pipeline, settings: Settings, audit: AuditRecorder | None = None
) -> Callable[[], Awaitable[None]]:
    """A faust task: start the run, checkpoint it periodically, finish it when cancelled at stop."""

    async def run() -> None:
        # The worker's one recorder (closed by the worker at stop), else one of our own.
        recorder = audit if audit is not None else getattr(pipeline, "audit", None) or recorder_for(settings)
        session = IngestionRun(
            settings.data_dir,
            "worker",
            f"{settings.topics.input} (stages={settings.stages}, group={settings.group_id})",
            checkpoint_s=settings.integrity.run_checkpoint_s,
            audit=recorder,
            actor=f"worker:{settings.app_id}",
            # The worker session's audit event, when the worker records one: the run hangs below it.
            parent=getattr(pipeline.evaluate, "session", None),
        )
        loop = asyncio.get_running_loop()
        # runs.duckdb is shared with other processes: every write may wait on their locks.
        await loop.run_in_executor(None, session.start)
        try:
            while True:
                await asyncio.sleep(settings.integrity.run_checkpoint_s)
                collect(pipeline, session)
                await loop.run_in_executor(None, session.checkpoint)
        finally:
            collect(pipeline, session)
            # Cancelled at shutdown: finish synchronously, the loop is going away.
            with contextlib.suppress(Exception):
                session.finish("finished")

    return run
