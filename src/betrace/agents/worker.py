"""Start a worker: validate everything first, then hand over to faust."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Awaitable, Callable

import faust

from betrace.agents.app import Pipeline, build_pipeline
from betrace.api.http import start_api_server
from betrace.api.keys import KEYS_FILE, ApiKeyStore
from betrace.config import Settings
from betrace.observability.health import HealthChecks, assignment_check, data_dir_check, lag_checks
from betrace.observability.lag_monitor import LagMonitor
from betrace.observability.prometheus import PrometheusHooks
from betrace.observability.web import register_routes
from betrace.rules.loader import load_rules
from betrace.rules.watcher import RuleWatcher, cache_path_for
from betrace.streams.admin import ensure_topics
from betrace.streams.topics import verdicts_topic

logger = logging.getLogger(__name__)


def build_worker(settings: Settings) -> tuple[Pipeline, RuleWatcher, HealthChecks, LagMonitor]:
    """The pipeline with hot-reloaded rules, metrics, the lag monitor and health routes."""
    seed = load_rules(settings.rules_dir)  # bad YAML fails here, before any network
    rules = RuleWatcher(
        settings.brokers,
        settings.topics.rules,
        cache_path=cache_path_for(settings.data_dir, settings.topics.rules),
        seed=seed.rules,
        replication_factor=settings.topics.replication_factor,
    )
    hooks = PrometheusHooks(max_tenants=settings.metrics_max_tenants)
    pipeline = build_pipeline(settings, rules, hooks)
    topics = settings.topics
    consumed = [topics.input] if pipeline.upstream else []
    if pipeline.downstream:
        consumed += [topics.spans, topics.traces, verdicts_topic(settings)]
    monitor = LagMonitor(
        settings.brokers,
        settings.group_id,
        consumed,
        hooks,
        threshold=settings.lag_threshold,
        interval_s=settings.lag_interval_s,
    )
    health = HealthChecks()
    health.add("data_dir", data_dir_check(settings.data_dir))
    health.add("partitions", assignment_check(pipeline.app))
    for name, check in lag_checks(monitor).items():
        health.add(name, check)
    pipeline.app.timer(settings.lag_interval_s, name="betrace.lag_monitor")(monitor.poll)
    # Follows the rules topic in faust's loop; faust cancels it at shutdown.
    pipeline.app.task(rules.run)
    pipeline.app.task(_lifecycle(pipeline, settings, monitor))
    if pipeline.downstream:
        pipeline.app.timer(3600.0, name="betrace.retention")(_retention(pipeline, settings))
    if settings.web_port:
        pipeline.app.conf.web_bind = settings.web_bind
        register_routes(pipeline.app, hooks, health, monitor)
    return pipeline, rules, health, monitor


def _lifecycle(pipeline: Pipeline, settings: Settings, monitor: LagMonitor) -> Callable[[], Awaitable[None]]:
    """Serve the query API while the worker runs; close it, the ledger and the lag reader at stop."""

    async def run() -> None:
        server = None
        if settings.api_port and pipeline.downstream:
            keys = ApiKeyStore(settings.api_keys_file or settings.data_dir / KEYS_FILE)
            server = await start_api_server(
                pipeline.store, keys, host=settings.api_host, port=settings.api_port, ledger=pipeline.ledger
            )
            logger.info("query API on %s", server.url)
        try:
            await asyncio.Event().wait()  # until faust cancels the task at shutdown
        finally:
            if server is not None:
                await server.stop()
            if pipeline.ledger is not None:
                await pipeline.ledger.close()
            await monitor.stop()

    return run


def _retention(pipeline: Pipeline, settings: Settings) -> Callable[[], Awaitable[None]]:
    """Hourly: remove hot data past retention, but only what archival has covered."""

    def sweep() -> None:
        for tenant in pipeline.store.tenants():
            pipeline.store.apply_retention(tenant, retention_s=settings.retention_days * 86400)

    async def run() -> None:
        await pipeline.store.run(sweep)

    return run


def run_worker(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT. Bad rules or an unreachable broker fail before start."""
    pipeline, rules, _, _ = build_worker(settings)
    asyncio.run(ensure_topics(settings))
    # Nothing may be evaluated rule-less: read the rules topic to its end first.
    asyncio.run(rules.prime())
    logger.info(
        "worker %s starting: brokers=%s input=%s (%s) data=%s web=%s",
        settings.app_id,
        settings.brokers,
        settings.topics.input,
        settings.topics.input_encoding,
        settings.data_dir,
        f"http://{settings.web_bind}:{settings.web_port}" if settings.web_port else "off",
    )
    # The stages allocate many short-lived objects per batch while holding many live
    # ones (open traces): default GC thresholds rescan those live objects constantly.
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)
    worker = faust.Worker(
        pipeline.app,
        loglevel=settings.log_level.lower(),
        quiet=True,
        redirect_stdouts=False,
        override_logging=False,
    )
    worker.execute_from_commandline()
