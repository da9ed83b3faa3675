"""The signal ledger of the tenants a worker owns: one embedded file per tenant, or TigerBeetle.

The embedded ledger is a DuckDB file, and DuckDB allows one writer per file.
With several downstream workers, each tenant belongs to one worker (see
:mod:`betrace.sinks.duckdb_store`), so each tenant gets its own embedded
ledger, ``<data_dir>/ledger/tenant=<t>.duckdb`` (ledger = tenant, as in the
data model), opened while the worker owns the tenant and closed when its
partition is revoked. With TigerBeetle every worker shares one cluster client.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from betrace.metrics import StageHooks
from betrace.sinks.attached import AttachedFiles
from betrace.sinks.ledger.archival import ArchivalEvent, ArchivalLedger
from betrace.sinks.ledger.embedded import EmbeddedLedger
from betrace.sinks.ledger.model import Ledger, LedgerError, LedgerLockedError, Transfer
from betrace.sinks.ledger.signals import RuleCount, SignalLedger

logger = logging.getLogger(__name__)

LEDGER_DIR = "ledger"

R = TypeVar("R")


def tenant_ledger_path(data_dir: Path, tenant: str) -> Path:
    """Where the embedded ledger of ``tenant`` lives."""
    return data_dir / LEDGER_DIR / f"tenant={tenant}.duckdb"


def open_embedded(
    path: Path, *, read_only: bool = False, timeout_s: float = 30.0, files: AttachedFiles | None = None
) -> EmbeddedLedger:
    """Open an embedded ledger, waiting out another process's lock (its previous owner) a while."""
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    while True:
        try:
            return EmbeddedLedger(path, read_only=read_only, files=files)
        except LedgerError as exc:
            locked = isinstance(exc, LedgerLockedError) or "lock" in str(exc).lower()
            if not locked or time.monotonic() >= deadline:
                raise
            time.sleep(delay * (0.5 + random.random()))  # noqa: S311 - jitter, not crypto
            delay = min(delay * 2, 0.25)


class TenantLedgers:
    """Route signal ledger work to the tenant's own ledger; open and close them with ownership."""

    def __init__(
        self,
        data_dir: Path,
        *,
        hooks: StageHooks,
        flush_items: int = 128,
        flush_interval_s: float = 0.05,
        shared: Ledger | None = None,
        owns: Callable[[str], bool] = lambda _tenant: True,
        open_timeout_s: float = 30.0,
        files: AttachedFiles | None = None,
    ) -> None:
        self.data_dir = data_dir
        #: The DuckDB instance the owned ledgers attach to (the store's, in a worker); else one each.
        self.files = files
        self.hooks = hooks
        self.flush_items = flush_items
        self.flush_interval_s = flush_interval_s
        self.owns = owns
        self.open_timeout_s = open_timeout_s
        #: TigerBeetle: one client for every tenant (the cluster has no per-file lock).
        self.shared = (
            SignalLedger(shared, hooks=hooks, flush_items=flush_items, flush_interval_s=flush_interval_s)
            if shared is not None
            else None
        )
        self._ledgers: dict[str, SignalLedger] = {}
        self._lock = threading.Lock()

    def open_tenants(self) -> list[str]:
        with self._lock:
            return sorted(self._ledgers)

    def for_tenant(self, tenant: str) -> SignalLedger:
        """Blocking: the tenant's ledger, opened on first use (only while this worker owns it)."""
        if self.shared is not None:
            return self.shared
        with self._lock:
            found = self._ledgers.get(tenant)
        if found is not None:
            return found
        if not self.owns(tenant):
            msg = f"ledger of tenant {tenant!r}: another worker owns this tenant"
            raise LedgerLockedError(msg)
        raw = open_embedded(
            tenant_ledger_path(self.data_dir, tenant), timeout_s=self.open_timeout_s, files=self.files
        )
        ledger = SignalLedger(
            raw, hooks=self.hooks, flush_items=self.flush_items, flush_interval_s=self.flush_interval_s
        )
        with self._lock:
            self._ledgers[tenant] = ledger
        return ledger

    async def record(self, docs: list[dict[str, Any]]) -> tuple[int, int]:
        """Record signals on their tenants' ledgers; return (newly counted, already recorded)."""
        tenants = list(dict.fromkeys(doc["tenant"] for doc in docs))
        opened = await asyncio.to_thread(lambda: [self.for_tenant(t) for t in tenants])
        # Distinct ledgers write at once (each has its own writer thread); one after the
        # other, a batch of many tenants waited for one event-loop turn per step and tenant.
        groups: dict[int, tuple[SignalLedger, list[dict[str, Any]]]] = {}
        ledger_of = {
            t: groups.setdefault(id(ledger), (ledger, []))[1]
            for t, ledger in zip(tenants, opened, strict=True)
        }
        for doc in docs:
            ledger_of[doc["tenant"]].append(doc)
        # All finish before a failure is raised: a retry must not race a ledger still writing.
        done = await asyncio.gather(
            *(ledger.record(group) for ledger, group in groups.values()), return_exceptions=True
        )
        for result in done:
            if isinstance(result, BaseException):
                raise result
        counts = [r for r in done if not isinstance(r, BaseException)]
        return sum(c for c, _ in counts), sum(d for _, d in counts)

    async def run(self, fn: Any, *args: Any) -> Any:
        """Run a blocking call off the event loop (each ledger serializes its own work)."""
        return await asyncio.to_thread(fn, *args)

    def counts(self, tenant: str, rule_id: str) -> list[RuleCount]:
        """Blocking: per-version counters of ``rule_id`` — from the open ledger, else read-only."""
        return self._read(tenant, lambda ledger: ledger.counts(tenant, rule_id), [])

    def signal_transfers(self, tenant: str, rule_id: str, version: int, **kwargs: Any) -> list[Transfer]:
        """Blocking: one rule version's signal transfers (see :meth:`SignalLedger.signal_transfers`)."""

        def read(ledger: SignalLedger) -> list[Transfer]:
            return ledger.signal_transfers(tenant, rule_id, version, **kwargs)

        return self._read(tenant, read, [])

    def _read(self, tenant: str, fn: Callable[[SignalLedger], R], empty: R) -> R:
        if self.shared is not None:
            return self.shared._executor.submit(fn, self.shared).result()
        with self._lock:
            ledger = self._ledgers.get(tenant)
        if ledger is not None:  # on its own thread: a DuckDB connection is not shared across threads
            return ledger._executor.submit(fn, ledger).result()
        path = tenant_ledger_path(self.data_dir, tenant)
        if not path.exists():
            return empty
        reader = SignalLedger(open_embedded(path, read_only=True, timeout_s=0), hooks=self.hooks)
        try:
            return fn(reader)
        finally:
            reader.shutdown()

    async def flush_if_due(self) -> None:
        """For a timer: flush every open ledger whose batch is due."""
        for ledger in self._all():
            await ledger.sink.flush_if_due()

    def _all(self) -> list[SignalLedger]:
        with self._lock:
            out = list(self._ledgers.values())
        return [*out, self.shared] if self.shared is not None else out

    async def release(self, tenants: list[str] | None = None) -> list[str]:
        """Flush and close the embedded ledgers of ``tenants`` (all open ones when ``None``)."""
        with self._lock:
            names = list(self._ledgers) if tenants is None else [t for t in tenants if t in self._ledgers]
            doomed = [(t, self._ledgers.pop(t)) for t in names]
        for tenant, ledger in doomed:
            try:
                await ledger.close()
            except Exception:
                logger.warning("ledger of tenant %r: flush at release failed", tenant, exc_info=True)
        return [t for t, _ in doomed]

    async def close(self) -> None:
        """Flush and close every ledger."""
        await self.release()
        if self.shared is not None:
            await self.shared.close()


class TenantArchivalLedger(ArchivalLedger):
    """:class:`ArchivalLedger` over :class:`TenantLedgers`: each event goes to its tenant's ledger."""

    def __init__(self, ledgers: TenantLedgers) -> None:  # the per-tenant ledgers replace ``signals``
        self.ledgers = ledgers
        self._per_tenant: dict[str, ArchivalLedger] = {}

    def _for(self, tenant: str) -> ArchivalLedger:
        found = self._per_tenant.get(tenant)
        if found is None or found.signals is not self.ledgers.for_tenant(tenant):
            found = self._per_tenant[tenant] = ArchivalLedger(self.ledgers.for_tenant(tenant))
        return found

    def post(self, events: list[ArchivalEvent]) -> int:
        by_tenant: dict[str, list[ArchivalEvent]] = {}
        for ev in events:
            by_tenant.setdefault(ev.tenant, []).append(ev)
        return sum(self._for(tenant).post(group) for tenant, group in by_tenant.items())

    def balance(self, tenant: str, kind: str, stage: str) -> int:
        return self._for(tenant).balance(tenant, kind, stage)
