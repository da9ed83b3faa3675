"""HTTP routes on the worker's web server: metrics, health and stats."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from faust.web import View

from betrace.observability.health import HealthChecks
from betrace.observability.lag_monitor import LagMonitor
from betrace.observability.prometheus import PROMETHEUS_CONTENT_TYPE, PrometheusHooks
from betrace.receiver import PATH, Receiver

logger = logging.getLogger(__name__)


def register_routes(app: Any, hooks: PrometheusHooks, health: HealthChecks, lag: LagMonitor | None) -> None:
    """``/metrics``, ``/health/live``, ``/health/ready`` and ``/v1/stats`` on a faust app."""

    async def metrics(view: Any, request: Any) -> Any:
        return view.bytes(hooks.exposition(), content_type=PROMETHEUS_CONTENT_TYPE)

    async def live(view: Any, request: Any) -> Any:
        return view.json(health.live())

    async def ready(view: Any, request: Any) -> Any:
        ok, checks = health.ready()
        return view.json({"ready": ok, "checks": checks}, status=200 if ok else 503)

    async def stats(view: Any, request: Any) -> Any:
        doc: dict[str, Any] = {"metrics": hooks.snapshot()}
        if lag is not None:
            snap = lag.snapshot
            doc["consumer_lag"] = {
                "group": lag.group,
                "taken_at": snap.taken_at,
                "total": snap.total(lag.group),
                "lagging": lag.lagging,
                "error": snap.error,
                "partitions": [p.as_dict() for p in snap.partitions],
            }
        return view.json(doc)

    app.page("/metrics", name="betrace-metrics")(metrics)
    app.page("/health/live", name="betrace-live")(live)
    app.page("/health/ready", name="betrace-ready")(ready)
    app.page("/v1/stats", name="betrace-stats")(stats)


def register_receiver(app: Any, receiver: Receiver) -> None:
    """``POST /v1/traces`` (the OTLP/HTTP receiver) on a faust app; its producer closes with the app."""

    class OtlpTraces(View):
        async def post(self, request: Any) -> Any:
            # faust's aiohttp driver hands over aiohttp's own request: the body streams from it.
            return await receiver.handle(request)

    app.page(PATH, name="betrace-otlp-traces")(OtlpTraces)

    async def lifecycle() -> None:
        try:
            await asyncio.Event().wait()  # until faust cancels the task at shutdown
        finally:
            await receiver.stop()

    app.task(lifecycle)
