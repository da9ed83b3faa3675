"""Trace metadata shared across workers: trace id -> tenant, state, verdict (and the decision).

The assembler remembers the decision of every closed trace for late spans
(faust changelog table ``assembly-decisions``). This cache writes those
decisions through to Redis, batched (one pipeline of ``SET PX`` per close
tick, off the span path), and looks up traces the assembler does not know
with one ``MGET`` per input batch. A worker that takes over a partition, or
one whose local decision was evicted by ``BETRACE_DECISION_CACHE_MAX_TRACES``,
then still sees that a late span's trace was decided and judges the span
against that decision instead of opening a new trace.

The changelog stays the source of truth: Redis is written only after the
changelog write was delivered, entries expire with the tenant's decision
window, and with Redis down the assembler behaves exactly as without it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any

import orjson

from betrace.agents.assembly import summary as sm
from betrace.agents.assembly.state import Decision, decode_decision
from betrace.cache.tier import CacheTier, NamedCache
from betrace.rules.model import CompiledRule

logger = logging.getLogger(__name__)

NAME = "trace_meta"


class TraceMetaCache:
    """Write-through / batched lookup of decided traces; see the module docstring."""

    def __init__(
        self,
        tier: CacheTier,
        *,
        ttl_s: float,
        rules_for: Callable[[str], list[CompiledRule]],
        decision_window_s: Callable[[str], float],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cache: NamedCache = tier.cache(NAME, ttl_s)
        self.ttl_s = ttl_s
        self.rules_for = rules_for
        self.decision_window_s = decision_window_s
        self.clock = clock

    def _meta(self, trace_id: str, value: bytes, decision: Decision | None) -> tuple[bytes, float] | None:
        if decision is None:
            decision = decode_decision(0, value)
        window = self.decision_window_s(decision.tenant)
        ttl = min(self.ttl_s, window - (self.clock() - decision.closed_at))
        if ttl <= 0:
            return None
        violated = any(
            sm.violated(c, decision.summaries.get(sm.rule_key(c))) for c in self.rules_for(decision.tenant)
        )
        doc = {
            "trace_id": trace_id,
            "tenant": decision.tenant,
            "state": "decided",
            "verdict": "violation" if violated else "pass",
            "closed_at": decision.closed_at,
            "decision": orjson.Fragment(value),
        }
        return orjson.dumps(doc), ttl

    def write_through(
        self, decisions: Mapping[str, bytes], decoded: Mapping[str, Decision] | None = None
    ) -> Coroutine[Any, Any, None]:
        """Store encoded decisions (``assembly.state.encode_decision``) of closed traces.

        ``decoded`` holds the same decisions as objects, where the caller has them:
        decoding thousands of just-encoded decisions per close tick cost the event
        loop several percent. The entries are built when this is called, while the
        objects still match the bytes just delivered to the changelog (a later
        late span changes them in place); the returned coroutine only sends them.
        """
        known = decoded or {}
        by_ttl: dict[int, dict[str, bytes]] = {}
        for trace_id, value in decisions.items():
            try:
                made = self._meta(trace_id, value, known.get(trace_id))
            except (ValueError, KeyError, TypeError) as exc:
                logger.warning("trace meta: skipping an undecodable decision of %s: %s", trace_id, exc)
                continue
            if made is not None:
                # One pipeline per distinct TTL second: decisions of one tick share it.
                by_ttl.setdefault(max(1, int(made[1])), {})[trace_id] = made[0]
        return self._send(by_ttl)

    async def _send(self, by_ttl: dict[int, dict[str, bytes]]) -> None:
        for ttl, items in by_ttl.items():
            # Not into the in-process LRU: the assembler already remembers its own decisions,
            # and the LRU's copies held 4-16 KB per trace (orjson's output buffers) up to its
            # 50,000-entry cap.
            await self.cache.aset_many(items, ttl_s=float(ttl), local=False)

    async def lookup(self, trace_ids: Iterable[str]) -> dict[str, bytes]:
        """Encoded decisions of the given traces that some worker decided and that are still live."""
        found = await self.cache.aget_many(list(trace_ids))
        out: dict[str, bytes] = {}
        now = self.clock()
        for trace_id, raw in found.items():
            try:
                doc = orjson.loads(raw)
                decision = orjson.dumps(doc["decision"])
                closed_at = float(doc["closed_at"])
                tenant = str(doc["tenant"])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                logger.warning("trace meta: ignoring an unreadable entry of %s: %s", trace_id, exc)
                continue
            if now - closed_at < self.decision_window_s(tenant):
                out[trace_id] = decision
        return out

    async def meta(self, trace_id: str) -> dict[str, object] | None:
        """The metadata document of one trace (tenant, state, verdict, closed_at), or None."""
        raw = await self.cache.aget(trace_id)
        if raw is None:
            return None
        doc: dict[str, object] = orjson.loads(raw)
        doc.pop("decision", None)
        return doc
