"""The audit trail over HTTP (read-only: the trail has no update or delete path).

    GET /v1/audit/events?type=&actor=&subject=&outcome=&since=&until=&limit=&cursor=
    GET /v1/audit/events/{event_id}
    GET /v1/audit/events/{event_id}/children?limit=&cursor=
    GET /v1/audit/events/{event_id}/chain?max_depth=

Visibility: a tenant's API key sees the events of its tenant, and only
those. Events of no tenant (worker starts and stops, breaker changes,
ingestion runs, archival: the operator's system events) are not served to
tenant keys; operators read them with ``betrace audit`` on the data
directory. A chain is walked through every event, but only the visible ones
are returned; ``hidden`` counts the others, and an event that is not
visible is a 404, exactly like one that does not exist.

Lists are in ``(recorded_at, event_id)`` order with an opaque ``cursor``
(:mod:`betrace.api.cursor`): ``recorded_at`` is assigned at commit and only
grows, so paging while workers keep writing neither misses nor repeats an
event. ``since``/``until`` (RFC 3339 or ns; ``until`` exclusive) bound when
events happened.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from aiohttp import web

from betrace.api import cursor as cursors
from betrace.api.http import BadRequestError, QueryApi, _int, _json, parse_time
from betrace.audit.events import EVENT_ID_RE, AuditEventType
from betrace.audit.schema import FILE_NAME
from betrace.audit.store import AuditStore, EventFilter
from betrace.config.sections import AuditSettings

_TYPES = {t.value for t in AuditEventType}
_TEXT_RE = re.compile(r"^[^\x00-\x1f]{1,500}$")


class AuditApi:
    """Handlers bound to the query API (authentication, thread pool) and an :class:`AuditStore`."""

    def __init__(self, api: QueryApi, store: AuditStore, limits: AuditSettings | None = None) -> None:
        self.api = api
        self.store = store
        self.limits = limits or AuditSettings()

    def _event_id(self, request: web.Request) -> str:
        event_id = request.match_info["event_id"]
        if not EVENT_ID_RE.match(event_id):
            msg = "event_id: expected 1-64 of A-Z a-z 0-9 _ . : -"
            raise BadRequestError(msg)
        return event_id

    def _limit(self, request: web.Request) -> int:
        return _int("limit", request.query.get("limit"), self.limits.page_size, 1, self.limits.page_max)

    def _text(self, request: web.Request, name: str) -> str | None:
        value = request.query.get(name)
        if value is None or value == "":
            return None
        if not _TEXT_RE.match(value):
            msg = f"{name}: expected 1-500 printable characters"
            raise BadRequestError(msg)
        return value

    async def events(self, request: web.Request) -> web.Response:
        key = self.api._authenticate(request)
        allowed = {"type", "actor", "subject", "outcome", "since", "until", "limit", "cursor"}
        self.api._only(request, allowed)
        q = request.query
        types = tuple(t.strip() for t in q.get("type", "").split(",") if t.strip())
        unknown = sorted(set(types) - _TYPES)
        if unknown:
            msg = f"type: unknown {', '.join(unknown)}; expected any of {', '.join(sorted(_TYPES))}"
            raise BadRequestError(msg)
        flt = EventFilter(
            event_types=types,
            tenant=key.tenant,
            actor=self._text(request, "actor"),
            subject=self._text(request, "subject"),
            outcome=self._text(request, "outcome"),
            since=parse_time("since", q.get("since")),
            until=parse_time("until", q.get("until")),
        )
        limit = self._limit(request)
        filters = {"path": "audit.events", **flt.as_dict()}
        after = cursors.decode(q["cursor"], filters) if q.get("cursor") else None
        page = await self.api._blocking(self.store.list_events, flt, limit=limit, after=after)
        last = page.items[-1] if page.items else None
        resume = cursors.encode((last["recorded_at"], last["event_id"]), filters) if last else q.get("cursor")
        return _json(
            {
                "items": page.items,
                "next_cursor": cursors.encode(page.next_key, filters) if page.next_key else None,
                # After the last item even when nothing follows yet: a client that tails the
                # trail asks again later with it and gets only events written since.
                "resume_cursor": resume,
                "limit": limit,
            }
        )

    @staticmethod
    def _page(
        items: list[dict[str, Any]], next_key: tuple[int, str] | None, filters: dict[str, object], limit: int
    ) -> web.Response:
        next_cursor = cursors.encode(next_key, filters) if next_key else None
        return _json({"items": items, "next_cursor": next_cursor, "limit": limit})

    async def event(self, request: web.Request) -> web.Response:
        key = self.api._authenticate(request)
        self.api._only(request, set())
        event_id = self._event_id(request)
        doc = await self.api._blocking(self.store.get, event_id)
        if doc is None or doc["tenant"] != key.tenant:
            return _json({"error": {"status": 404, "reason": f"no audit event {event_id}"}}, 404)
        return _json(doc)

    async def children(self, request: web.Request) -> web.Response:
        key = self.api._authenticate(request)
        self.api._only(request, {"limit", "cursor"})
        event_id = self._event_id(request)
        parent = await self.api._blocking(self.store.get, event_id)
        if parent is None or parent["tenant"] != key.tenant:
            return _json({"error": {"status": 404, "reason": f"no audit event {event_id}"}}, 404)
        limit = self._limit(request)
        filters: dict[str, object] = {"path": "audit.children", "parent": event_id, "tenant": key.tenant}
        raw = request.query.get("cursor")
        after = cursors.decode(raw, filters) if raw else None
        page = await self.api._blocking(
            self.store.children, event_id, limit=limit, after=after, tenant=key.tenant
        )
        return self._page(page.items, page.next_key, filters, limit)

    async def chain(self, request: web.Request) -> web.Response:
        key = self.api._authenticate(request)
        self.api._only(request, {"max_depth"})
        event_id = self._event_id(request)
        depth_cap = self.limits.chain_max_depth
        depth = _int("max_depth", request.query.get("max_depth"), depth_cap, 1, depth_cap)
        chain = await self.api._blocking(
            self.store.chain, event_id, max_depth=depth, max_events=self.limits.chain_max_events
        )
        if chain is None or chain.event["tenant"] != key.tenant:
            return _json({"error": {"status": 404, "reason": f"no audit event {event_id}"}}, 404)
        ancestors = [d for d in chain.ancestors if d["tenant"] == key.tenant]
        descendants = [d for d in chain.descendants if d["tenant"] == key.tenant]
        hidden = len(chain.ancestors) - len(ancestors) + len(chain.descendants) - len(descendants)
        return _json(
            {
                "event": chain.event,
                "ancestors": ancestors,
                "descendants": descendants,
                "hidden": hidden,
                "truncated": chain.truncated,
                "max_depth": depth,
            }
        )


def register_audit_routes(
    app: web.Application, api: QueryApi, data_dir: object, limits: AuditSettings | None = None
) -> None:
    """Add the audit routes when the API serves a data directory (``reader.data_dir``)."""
    if not isinstance(data_dir, Path):
        return
    limits = limits or AuditSettings()
    handlers = AuditApi(api, AuditStore(data_dir / FILE_NAME, lock_timeout_s=limits.lock_timeout_s), limits)
    app.router.add_get("/v1/audit/events", handlers.events)
    app.router.add_get("/v1/audit/events/{event_id}", handlers.event)
    app.router.add_get("/v1/audit/events/{event_id}/children", handlers.children)
    app.router.add_get("/v1/audit/events/{event_id}/chain", handlers.chain)
