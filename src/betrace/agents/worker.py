"""Start a worker: validate everything first, then hand over to faust."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import faust

from betrace.agents.app import Pipeline, build_pipeline
from betrace.agents.gc_policy import tune_gc
from betrace.api.http import start_api_server
from betrace.api.keys import KEYS_FILE, ApiKeyStore
from betrace.archive.worker import WorkerArchive
from betrace.audit.store import recorder_for
from betrace.cache import CacheTier, api_key_cache, build_tier
from betrace.cache.rules import RuleSetCache
from betrace.cache.traces import TraceMetaCache
from betrace.config import Settings
from betrace.ingestion.worker import worker_run
from betrace.logs import include_library_logs
from betrace.observability.diagnostics import dump_safely
from betrace.observability.health import (
    HealthChecks,
    assignment_check,
    data_dir_check,
    lag_checks,
    recovery_check,
    resilience_checks,
)
from betrace.observability.lag_monitor import LagMonitor
from betrace.observability.prometheus import PrometheusHooks
from betrace.observability.web import register_receiver, register_routes
from betrace.receiver import Receiver, pressure_from
from betrace.resilience.breakers import BreakerRegistry
from betrace.rules.loader import load_rules
from betrace.rules.watcher import RuleWatcher, cache_path_for
from betrace.streams.admin import ensure_topics
from betrace.streams.topics import verdicts_topic

logger = logging.getLogger(__name__)


def build_worker(settings: Settings) -> tuple[Pipeline, RuleWatcher, HealthChecks, LagMonitor]:
    """The pipeline with hot-reloaded rules, metrics, the lag monitor and health routes."""
    hooks = PrometheusHooks(max_tenants=settings.metrics_max_tenants)
    # One audit recorder per process, handed to every component that records events.
    audit = recorder_for(settings, hooks)
    # One registry for every breaker of the process (the cache tier's "redis" one included).
    breakers = BreakerRegistry.from_settings(settings, hooks=hooks, audit=audit)
    tier = build_tier(settings, hooks, breakers)
    rule_cache = RuleSetCache(
        tier, max_compiled=settings.cache.local_max_entries, ttl_s=settings.cache.rules_ttl_s
    )
    # Bad YAML fails here, before any network; the compiles land in the rules cache.
    seed = load_rules(settings.rules_dir, rule_cache.compile)
    rules = RuleWatcher(
        settings.brokers,
        settings.topics.rules,
        cache_path=cache_path_for(settings.data_dir, settings.topics.rules),
        seed=seed.rules,
        replication_factor=settings.topics.replication_factor,
        rule_cache=rule_cache,
        warm=settings.cache.warm_on_start,
        audit=audit,
    )
    pipeline = build_pipeline(settings, rules, hooks, audit=audit, breakers=breakers)
    _attach_cache(pipeline, tier, rules)
    # Archival, the retention hook and hot+cold queries live where the tenant files are owned.
    archive = WorkerArchive(pipeline, settings, breakers=breakers) if pipeline.downstream else None
    topics = settings.topics
    consumed = [topics.input] if pipeline.upstream else []
    if pipeline.downstream:
        consumed += [topics.spans, topics.store, topics.traces, verdicts_topic(settings)]
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
    health.add("state", recovery_check(pipeline.app))
    for name, check in lag_checks(monitor).items():
        health.add(name, check)
    for name, check in resilience_checks(pipeline.resilience, settings).items():
        health.add(name, check)
    pipeline.app.timer(settings.lag_interval_s, name="betrace.lag_monitor")(monitor.poll)
    # Follows the rules topic in faust's loop; faust cancels it at shutdown.
    pipeline.app.task(rules.run)
    pipeline.app.task(_lifecycle(pipeline, settings, monitor, archive))
    pipeline.app.task(worker_run(pipeline, settings))  # this session as an ingestion run
    if pipeline.downstream:
        pipeline.app.timer(3600.0, name="betrace.retention")(_retention(pipeline, settings, archive))
        if archive is not None and settings.archive.enabled:
            pipeline.app.task(archive.task())  # daily at BETRACE_ARCHIVE__SCHEDULE
    if settings.web_port:
        pipeline.app.conf.web_bind = settings.web_bind
        register_routes(pipeline.app, hooks, health, monitor)
        if settings.receiver.enabled:
            pressure = pressure_from(pipeline.resilience.backpressure)
            register_receiver(pipeline.app, Receiver(settings, hooks, pressure=pressure))
    return pipeline, rules, health, monitor


def _lifecycle(
    pipeline: Pipeline, settings: Settings, monitor: LagMonitor, archive: WorkerArchive | None = None
) -> Callable[[], Awaitable[None]]:
    """Serve the query API while the worker runs; close it, the ledger and the lag reader at stop."""

    async def run() -> None:
        server = None
        if settings.api_port and pipeline.downstream:
            keys = ApiKeyStore(
                settings.api_keys_file or settings.data_dir / KEYS_FILE,
                api_key_cache(pipeline.cache) if pipeline.cache is not None else None,
            )
            server = await start_api_server(
                pipeline.store,
                keys,
                host=settings.api_host,
                port=settings.api_port,
                ledger=pipeline.ledger,
                cold=archive.catalog if archive is not None else None,
                audit=settings.audit,
            )
            logger.info("query API on %s", server.url)
        try:
            await asyncio.Event().wait()  # until faust cancels the task at shutdown
        finally:
            if server is not None:
                await server.stop()
            await pipeline.release_tenants()  # flush, then hand the tenant files over
            if pipeline.ledger is not None:
                await pipeline.ledger.close()
            pipeline.resilience.close()
            await monitor.stop()
            pipeline.session.stop()
            await asyncio.to_thread(pipeline.session.close)
            if pipeline.cache is not None:
                await pipeline.cache.aclose()

    return run


def _attach_cache(pipeline: Pipeline, tier: CacheTier, rules: RuleWatcher) -> None:
    """Give the pipeline the cache tier and, downstream, the shared trace metadata."""
    pipeline.cache = tier
    if tier.settings.enabled and pipeline.downstream:
        settings = pipeline.settings
        pipeline.trace_meta = TraceMetaCache(
            tier,
            ttl_s=settings.cache.trace_meta_ttl_s,
            rules_for=lambda tenant: rules.current().for_tenant(tenant),
            decision_window_s=lambda tenant: settings.assembly_policy(tenant).decision_cache_s,
        )


def _retention(
    pipeline: Pipeline, settings: Settings, archive: WorkerArchive | None = None
) -> Callable[[], Awaitable[None]]:
    """Hourly: remove hot data past retention, but only what archival has covered."""
    status = archive.status if archive is not None else None

    def sweep() -> None:
        for tenant in pipeline.store.tenants():
            pipeline.store.apply_retention(
                tenant, retention_s=settings.retention_days * 86400, archive=status
            )

    async def run() -> None:
        await pipeline.store.run(sweep)

    return run


class _Worker(faust.Worker):
    """faust's worker; SIGUSR1 logs where messages are held instead of every thread's stack."""

    def __init__(self, pipeline: Pipeline, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pipeline = pipeline

    def _on_sigusr1(self) -> None:
        dump_safely(self._pipeline.app, self._pipeline.held)


def run_worker(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT. Bad rules or an unreachable broker fail before start."""
    pipeline, rules, _, _ = build_worker(settings)
    asyncio.run(ensure_topics(settings))
    # Nothing may be evaluated rule-less: read the rules topic to its end first.
    asyncio.run(rules.prime())
    # The root of this session's audit events; evaluation batches hang below it.
    pipeline.evaluate.session = pipeline.session.start()
    logger.info(
        "worker %s starting: brokers=%s input=%s (%s) data=%s web=%s",
        settings.app_id,
        settings.brokers,
        settings.topics.input,
        settings.topics.input_encoding,
        settings.data_dir,
        f"http://{settings.web_bind}:{settings.web_port}" if settings.web_port else "off",
    )
    tune_gc()
    include_library_logs()
    worker = _Worker(
        pipeline,
        pipeline.app,
        loglevel=settings.log_level.lower(),
        quiet=True,
        redirect_stdouts=False,
        override_logging=False,
    )
    try:
        worker.execute_from_commandline()
    finally:
        pipeline.session.stop("exit")
        pipeline.session.close()
