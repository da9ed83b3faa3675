"""The query API over HTTP (aiohttp): traces, signals and rule counters, per tenant.

    GET /v1/traces/{trace_id}                       one whole trace (404 if unknown)
    GET /v1/traces?start=&end=&service=&attribute=  trace summaries, paginated
    GET /v1/signals?rule=&start=&end=&severity=     signals, paginated
    GET /v1/signals/count?rule=                     per-version counters from the ledger
    GET /v1/openapi.json                            this API's OpenAPI 3.1 document

Authentication: ``Authorization: Bearer <key>`` (or ``X-API-Key``). The key
alone selects the tenant; naming another tenant (``X-Scope-OrgID`` header or
``tenant`` parameter) is a 403, so one tenant's key can never read another's
data. Lists take ``limit`` (1..1000, default 100) and either ``cursor`` (from
``next_cursor``) or ``offset``. ``start``/``end`` are RFC 3339 timestamps or
integer nanoseconds since the epoch; ``end`` is exclusive.

Two ways to serve it: inside the worker with :func:`start_api_server` over the
worker's own :class:`~betrace.sinks.duckdb_store.TenantStore` (live data), or
from another process (``betrace serve``) with :class:`ReadOnlyStore`, which
answers 503 while a worker holds a tenant's file (DuckDB's single-writer lock).

With several downstream workers, a worker's store reads the tenants it owns
through its own connection; a tenant another worker owns is opened read-only
per request, which only works while no process holds its file, so it is
usually a 503 with ``Retry-After`` whose reason names the tenant's partition:
ask the worker that owns it (route by ``tenant_partition``), or retry.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import duckdb
import orjson
from aiohttp import web

from betrace.api import cursor as cursors
from betrace.api import queries
from betrace.api.keys import ApiKey, ApiKeyStore, AuthError, ForbiddenError
from betrace.api.openapi import OPENAPI
from betrace.archive.coldread import ColdCatalog
from betrace.config.sections import AuditSettings
from betrace.errors import BetraceError, SinkError
from betrace.sinks.duckdb_store import StoreBusyError
from betrace.sinks.ledger.signals import SignalLedger
from betrace.sinks.ledger.tenants import TenantLedgers

logger = logging.getLogger(__name__)

MAX_LIMIT = 1000
MAX_OFFSET = 100_000
_KEY: web.AppKey[Any] = web.AppKey("betrace_api", object)


class BadRequestError(BetraceError):
    """A parameter is missing, malformed or not allowed here (HTTP 400)."""


class TraceReader(Protocol):
    """Where the API reads a tenant's hot store from."""

    def has_tenant(self, tenant: str) -> bool: ...

    def cursor(self, tenant: str) -> AbstractContextManager[duckdb.DuckDBPyConnection]: ...


class ReadOnlyStore:
    """For other processes: open a tenant file read-only per request, never hold it."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    def path(self, tenant: str) -> Path:
        return self.data_dir / f"tenant={tenant}.duckdb"

    def has_tenant(self, tenant: str) -> bool:
        return self.path(tenant).exists()

    @contextmanager
    def cursor(self, tenant: str) -> Iterator[duckdb.DuckDBPyConnection]:
        try:
            con = duckdb.connect(str(self.path(tenant)), read_only=True)
        except duckdb.Error as exc:
            if "lock" in str(exc).lower():
                msg = (
                    f"tenant {tenant!r}: its store is held by a running worker; query the worker's API "
                    "(BETRACE_API_PORT) instead, or retry when it has stopped"
                )
                raise StoreBusyError(msg) from None
            msg = f"tenant {tenant!r}: cannot open its store: {exc}"
            raise SinkError(msg) from exc
        try:
            yield con
        finally:
            con.close()


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


def _error(status: int, reason: str, headers: dict[str, str] | None = None) -> web.Response:
    return _json({"error": {"status": status, "reason": reason}}, status, headers)


_NS_RE = re.compile(r"^\d{1,19}$")


def parse_time(name: str, value: str | None) -> int | None:
    """RFC 3339 or integer epoch nanoseconds → ns; BadRequestError otherwise."""
    if value is None or value == "":
        return None
    if _NS_RE.match(value):
        return int(value)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        msg = f"{name}: expected an RFC 3339 timestamp or integer nanoseconds, got {value[:40]!r}"
        raise BadRequestError(msg) from None
    if parsed.tzinfo is None:
        msg = f"{name}: the timestamp needs a time zone (e.g. a trailing Z)"
        raise BadRequestError(msg)
    return int(parsed.timestamp() * 1_000_000) * 1000


def _int(name: str, value: str | None, default: int, low: int, high: int) -> int:
    if value is None:
        return default
    if not re.fullmatch(r"\d{1,9}", value) or not low <= int(value) <= high:
        msg = f"{name}: expected an integer in {low}..{high}, got {value[:20]!r}"
        raise BadRequestError(msg)
    return int(value)


class QueryApi:
    """Request handlers bound to a reader, the key store and (optionally) the ledger."""

    def __init__(
        self,
        reader: TraceReader,
        keys: ApiKeyStore,
        ledger: SignalLedger | TenantLedgers | None = None,
        cold: ColdCatalog | None = None,
    ) -> None:
        self.reader = reader
        self.keys = keys
        self.ledger = ledger
        #: Archived days; with it every trace and signal query reads hot and cold together.
        self.cold = cold
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="betrace-api")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    async def _blocking(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    def _authenticate(self, request: web.Request) -> ApiKey:
        header = request.headers.get("Authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("X-API-Key")
        key = self.keys.authenticate(token)
        asked = request.headers.get("X-Scope-OrgID") or request.query.get("tenant")
        if asked and asked != key.tenant:
            msg = "this API key may not read another tenant's data"
            raise ForbiddenError(msg)
        return key

    @staticmethod
    def _only(request: web.Request, allowed: set[str]) -> None:
        unknown = sorted(set(request.query) - allowed - {"tenant"})
        if unknown:
            msg = f"unknown parameter(s): {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
            raise BadRequestError(msg)

    @staticmethod
    def _page(request: web.Request, filters: dict[str, object]) -> queries.Page:
        q = request.query
        limit = _int("limit", q.get("limit"), 100, 1, MAX_LIMIT)
        offset = _int("offset", q.get("offset"), 0, 0, MAX_OFFSET)
        raw = q.get("cursor")
        if raw and offset:
            msg = "give either cursor or offset, not both"
            raise BadRequestError(msg)
        after = cursors.decode(raw, filters) if raw else None
        return queries.Page(limit=limit, offset=offset, after=after)

    def _read(self, tenant: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self.reader.has_tenant(tenant):
            return None
        with self.reader.cursor(tenant) as con:
            if self.cold is not None:
                kwargs["tables"] = self.cold.attach(con)
            return fn(con, *args, **kwargs)

    async def trace(self, request: web.Request) -> web.Response:
        key = self._authenticate(request)
        self._only(request, set())
        trace_id = request.match_info["trace_id"].lower()
        if not queries.TRACE_ID_RE.match(trace_id):
            msg = "trace_id must be 32 hexadecimal characters"
            raise BadRequestError(msg)
        found = await self._blocking(self._read, key.tenant, queries.get_trace, trace_id)
        if found is None:
            return _error(404, f"no trace {trace_id}")
        return _json(found)

    async def traces(self, request: web.Request) -> web.Response:
        key = self._authenticate(request)
        self._only(request, {"start", "end", "service", "attribute", "limit", "offset", "cursor"})
        q = request.query
        start, end = parse_time("start", q.get("start")), parse_time("end", q.get("end"))
        attribute = None
        if q.get("attribute"):
            name, sep, value = q["attribute"].partition("=")
            if not sep or not queries.ATTRIBUTE_KEY_RE.match(name):
                msg = "attribute: expected key=value with a key of [A-Za-z0-9_.-/:]"
                raise BadRequestError(msg)
            attribute = (name, value)
        service = q.get("service") or None
        filters: dict[str, object] = {"start": start, "end": end, "service": service, "attribute": attribute}
        page = self._page(request, {"path": "traces", **filters})
        result = await self._blocking(
            self._read,
            key.tenant,
            queries.list_traces,
            start_ns=start,
            end_ns=end,
            service=service,
            attribute=attribute,
            page=page,
        )
        return self._list(result, page, {"path": "traces", **filters})

    async def signals(self, request: web.Request) -> web.Response:
        key = self._authenticate(request)
        self._only(request, {"rule", "start", "end", "severity", "limit", "offset", "cursor"})
        q = request.query
        start, end = parse_time("start", q.get("start")), parse_time("end", q.get("end"))
        severities = tuple(s.strip() for s in q.get("severity", "").split(",") if s.strip())
        bad = [s for s in severities if s not in queries.SEVERITIES]
        if bad:
            msg = f"severity: unknown {', '.join(bad)}; expected {', '.join(queries.SEVERITIES)}"
            raise BadRequestError(msg)
        rule = q.get("rule") or None
        filters: dict[str, object] = {"rule": rule, "start": start, "end": end, "severity": list(severities)}
        page = self._page(request, {"path": "signals", **filters})
        result = await self._blocking(
            self._read,
            key.tenant,
            queries.list_signals,
            rule=rule,
            start_ns=start,
            end_ns=end,
            severities=severities,
            page=page,
        )
        return self._list(result, page, {"path": "signals", **filters})

    @staticmethod
    def _list(result: queries.Result | None, page: queries.Page, filters: dict[str, object]) -> web.Response:
        if result is None:  # the tenant has no data yet
            result = queries.Result([], None)
        next_cursor = cursors.encode(result.next_key, filters) if result.next_key else None
        return _json({"items": result.items, "next_cursor": next_cursor, "limit": page.limit})

    async def signal_count(self, request: web.Request) -> web.Response:
        key = self._authenticate(request)
        self._only(request, {"rule"})
        rule = request.query.get("rule")
        if not rule:
            msg = "rule is required"
            raise BadRequestError(msg)
        if self.ledger is None:
            return _error(404, "no ledger is attached to this API server")
        counts = await self.ledger.run(self.ledger.counts, key.tenant, rule)
        versions = [{"version": c.version, "signals": c.signals} for c in counts]
        return _json({"rule": rule, "versions": versions, "total": sum(c.signals for c in counts)})

    @staticmethod
    async def openapi(_request: web.Request) -> web.Response:
        return _json(OPENAPI)


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        return _error(exc.status, exc.reason)
    except AuthError as exc:
        headers = {"WWW-Authenticate": 'Bearer realm="betrace"'} if exc.status == 401 else None
        return _error(exc.status, str(exc), headers)
    except (BadRequestError, cursors.CursorError) as exc:
        return _error(400, str(exc))
    except StoreBusyError as exc:
        return _error(503, str(exc), {"Retry-After": "1"})
    except BetraceError as exc:
        logger.warning("query API: %s %s failed: %s", request.method, request.path, exc)
        return _error(503 if exc.retriable else 500, str(exc))


def build_app(
    reader: TraceReader,
    keys: ApiKeyStore,
    *,
    ledger: SignalLedger | TenantLedgers | None = None,
    cold: ColdCatalog | None = None,
    audit: AuditSettings | None = None,
) -> web.Application:
    """The aiohttp application; mount it or run it with :func:`start_api_server`."""
    api = QueryApi(reader, keys, ledger, cold)
    app = web.Application(middlewares=[_errors])
    app[_KEY] = api
    app.router.add_get("/v1/openapi.json", api.openapi)
    app.router.add_get("/v1/traces", api.traces)
    app.router.add_get("/v1/traces/{trace_id}", api.trace)
    app.router.add_get("/v1/signals", api.signals)
    app.router.add_get("/v1/signals/count", api.signal_count)
    from betrace.api.audit import register_audit_routes  # noqa: PLC0415 - it imports this module

    register_audit_routes(app, api, getattr(reader, "data_dir", None), audit)  # that data dir's trail
    from betrace.api.ingestion import register_routes  # noqa: PLC0415 - it imports this module

    register_routes(app, api, reader)  # /v1/runs, /v1/anomalies

    async def _close(_app: web.Application) -> None:
        api.close()

    app.on_cleanup.append(_close)
    return app


class ApiServer:
    """A running query API; ``port`` is the bound port (useful with port 0)."""

    def __init__(self, runner: web.AppRunner, site: web.TCPSite, host: str, port: int) -> None:
        self._runner = runner
        self._site = site
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def stop(self) -> None:
        await self._runner.cleanup()


async def start_api_server(
    reader: TraceReader,
    keys: ApiKeyStore,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    ledger: SignalLedger | TenantLedgers | None = None,
    cold: ColdCatalog | None = None,
    audit: AuditSettings | None = None,
) -> ApiServer:
    """Serve the query API on ``host:port`` in the running event loop (port 0: any free port)."""
    runner = web.AppRunner(build_app(reader, keys, ledger=ledger, cold=cold, audit=audit), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = port
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            bound = int(address[1])
            break
    logger.info("query API listening on http://%s:%d", host, bound)
    return ApiServer(runner, site, host, bound)
