"""Query API routes for ingestion runs and integrity anomalies (issue 9).

    GET /v1/runs?kind=&state=&limit=&cursor=       ingestion runs, newest first
    GET /v1/runs/{run_id}                           one run (404 if unknown)
    GET /v1/anomalies?kind=&state=&trace_id=&...    the key's tenant's anomalies, oldest first

Runs are deployment-wide operational records (``<data_dir>/runs.duckdb``):
any valid key may read them; they hold counts and reasons, never span
content. Anomalies are per tenant like every other query: the key selects the
tenant's file. Both take ``limit`` and an opaque ``cursor`` from
``next_cursor``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from betrace.api import cursor as cursors
from betrace.api import queries
from betrace.ingestion.runs import KINDS, RUN_STATES, RunStore
from betrace.integrity.checks import KINDS as ANOMALY_KINDS
from betrace.integrity.store import STATES as ANOMALY_STATES
from betrace.integrity.store import list_anomalies

if TYPE_CHECKING:
    from betrace.api.http import QueryApi

_RUN_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,80}$")


def _choice(name: str, value: str | None, allowed: tuple[str, ...]) -> str | None:
    from betrace.api.http import BadRequestError  # noqa: PLC0415 - http.py imports this module

    if value is None or value == "":
        return None
    if value not in allowed:
        msg = f"{name}: expected one of {', '.join(allowed)}, got {value[:40]!r}"
        raise BadRequestError(msg)
    return value


class IngestionRoutes:
    def __init__(self, api: QueryApi, data_dir: Path | None) -> None:
        self.api = api
        self.data_dir = data_dir

    def _runs(self) -> RunStore | None:
        return RunStore(self.data_dir) if self.data_dir is not None else None

    async def runs(self, request: web.Request) -> web.Response:
        from betrace.api.http import _error, _int, _json  # noqa: PLC0415 - http.py imports this module

        self.api._authenticate(request)
        self.api._only(request, {"kind", "state", "limit", "cursor"})
        q = request.query
        kind = _choice("kind", q.get("kind"), KINDS)
        state = _choice("state", q.get("state"), RUN_STATES)
        limit = _int("limit", q.get("limit"), 100, 1, 1000)
        filters: dict[str, object] = {"path": "runs", "kind": kind, "state": state}
        after = cursors.decode(q["cursor"], filters) if q.get("cursor") else None
        store = self._runs()
        if store is None:
            return _error(404, "this API server has no data directory to read runs from")
        rows: list[dict[str, Any]] = await self.api._blocking(
            store.list, kind=kind, state=state, limit=limit + 1, after=after
        )
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = (
            cursors.encode((int(rows[-1]["started_ns"]), str(rows[-1]["run_id"])), filters) if more else None
        )
        return _json({"items": rows, "next_cursor": next_cursor, "limit": limit})

    async def run(self, request: web.Request) -> web.Response:
        from betrace.api.http import BadRequestError, _error, _json  # noqa: PLC0415 - http.py imports this module

        self.api._authenticate(request)
        self.api._only(request, set())
        run_id = request.match_info["run_id"]
        if not _RUN_ID.match(run_id):
            msg = "run_id: letters, digits, '.', '_' and '-' only"
            raise BadRequestError(msg)
        store = self._runs()
        row = await self.api._blocking(store.get, run_id) if store is not None else None
        if row is None:
            return _error(404, f"no ingestion run {run_id}")
        return _json(row)

    async def anomalies(self, request: web.Request) -> web.Response:
        from betrace.api.http import BadRequestError  # noqa: PLC0415 - http.py imports this module

        key = self.api._authenticate(request)
        self.api._only(request, {"kind", "state", "trace_id", "limit", "offset", "cursor"})
        q = request.query
        kind = _choice("kind", q.get("kind"), ANOMALY_KINDS)
        state = _choice("state", q.get("state"), ANOMALY_STATES)
        trace_id = (q.get("trace_id") or "").lower() or None
        if trace_id is not None and not queries.TRACE_ID_RE.match(trace_id):
            msg = "trace_id must be 32 hexadecimal characters"
            raise BadRequestError(msg)
        filters: dict[str, object] = {"path": "anomalies", "kind": kind, "state": state, "trace_id": trace_id}
        page = self.api._page(request, filters)
        result = await self.api._blocking(
            self._anomalies, key.tenant, kind=kind, state=state, trace_id=trace_id, page=page
        )
        return self.api._list(result, page, filters)

    def _anomalies(self, tenant: str, **kwargs: Any) -> queries.Result | None:
        """Hot store only: anomalies are not archived (the query API's cold tables do not apply)."""
        reader = self.api.reader
        if not reader.has_tenant(tenant):
            return None
        with reader.cursor(tenant) as con:
            return list_anomalies(con, **kwargs)


def register_routes(app: web.Application, api: QueryApi, reader: object) -> None:
    """Add the runs and anomalies routes; runs are read from the reader's data directory."""
    data_dir = getattr(reader, "data_dir", None)
    routes = IngestionRoutes(api, data_dir if isinstance(data_dir, Path) else None)
    app.router.add_get("/v1/runs", routes.runs)
    app.router.add_get("/v1/runs/{run_id}", routes.run)
    app.router.add_get("/v1/anomalies", routes.anomalies)
