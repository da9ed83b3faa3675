"""Start a worker: validate everything first, then hand over to faust."""

from __future__ import annotations

import asyncio
import logging

import faust

from betrace.agents.app import build_pipeline
from betrace.config import Settings
from betrace.rules.loader import load_rules
from betrace.streams.admin import ensure_topics

logger = logging.getLogger(__name__)


def run_worker(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT. Bad rules or an unreachable broker fail before start."""
    rules = load_rules(settings.rules_dir)
    asyncio.run(ensure_topics(settings))
    pipeline = build_pipeline(settings, rules)
    logger.info(
        "worker %s starting: brokers=%s input=%s (%s) rules=%d tenants=%s data=%s",
        settings.app_id,
        settings.brokers,
        settings.topics.input,
        settings.topics.input_encoding,
        len(rules.rules),
        ",".join(sorted(rules.tenants)) or "-",
        settings.data_dir,
    )
    worker = faust.Worker(
        pipeline.app,
        loglevel=settings.log_level.lower(),
        quiet=True,
        redirect_stdouts=False,
        override_logging=False,
    )
    worker.execute_from_commandline()
