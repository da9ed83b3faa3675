"""Signal sink: record signals once per tenant, then publish them to Kafka.

A signal is first inserted in the tenant's ``signals`` table (keyed by its
deterministic id), then — when a ledger is configured — recorded as an
immutable ledger transfer whose id is derived from the same key, then
produced, then marked emitted. A replay finds it already emitted and
publishes nothing; a crash between ledger and mark re-records it, which the
ledger answers ``exists`` (the rule's counter never moves twice); a crash
between produce and mark publishes it again with the same ``signal_id``,
which consumers can dedupe.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from betrace.metrics import StageHooks
from betrace.sinks.base import BatchingSink
from betrace.sinks.duckdb_store import TenantStore
from betrace.sinks.ledger.signals import SignalLedger

logger = logging.getLogger(__name__)

Publish = Callable[[list[dict[str, Any]]], Awaitable[None]]


class SignalSink(BatchingSink[dict[str, Any]]):
    """Deduplicate candidate signals against the store and publish the new ones."""

    step_id = "signals"

    def __init__(
        self,
        store: TenantStore,
        publish: Publish,
        *,
        max_items: int,
        hooks: StageHooks,
        ledger: SignalLedger | None = None,
    ) -> None:
        super().__init__(max_items=max_items, hooks=hooks)
        self.store = store
        self.publish = publish
        self.ledger = ledger
        self.emitted = 0

    async def write(self, batch: list[dict[str, Any]]) -> None:
        by_tenant: dict[str, list[dict[str, Any]]] = {}
        for doc in batch:
            by_tenant.setdefault(doc["tenant"], []).append(doc)
        for tenant, docs in by_tenant.items():
            pending: list[dict[str, Any]] = await self.store.run(
                self.store.insert_signals, tenant, docs, lane="signals"
            )
            if not pending:
                continue
            if self.ledger is not None:
                # Before publishing: a signal on the topic is always counted in the ledger.
                await self.ledger.record(pending)
            await self.publish(pending)
            await self.store.run(
                self.store.mark_emitted, tenant, [d["signal_id"] for d in pending], lane="signals"
            )
            self.emitted += len(pending)
            for doc in pending:
                self.hooks.count(
                    "betrace_signals_emitted_total", rule=doc["rule_id"], severity=doc["severity"]
                )
