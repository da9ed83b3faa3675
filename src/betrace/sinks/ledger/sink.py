"""Batched ledger writes: the ``add``/``write``/``flush`` sink contract over ``create_transfers``.

Flush policy (PRD-020a): a buffer is written when it holds ``flush_items``
transfers (128) or its oldest transfer has waited ``flush_interval_s`` (50 ms),
whichever comes first; one request carries at most 8,189 transfers. The
buffer holds at most ``capacity`` transfers: past that :meth:`add` raises
:class:`~betrace.errors.BackpressureError` instead of growing.

``exists`` is success: transfer ids are deterministic, so a replay answers
``exists`` and leaves every balance unchanged (exactly-once effects).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from betrace.metrics import StageHooks
from betrace.sinks.base import BatchingSink
from betrace.sinks.ledger.model import (
    MAX_BATCH,
    CreateTransferStatus,
    Ledger,
    LedgerError,
    LedgerRequestError,
    Transfer,
)

logger = logging.getLogger(__name__)

Run = Callable[..., Awaitable[Any]]

#: Statuses that mean "this exact id is already recorded": never a second effect.
DUPLICATE = frozenset(
    s for s in CreateTransferStatus if s == CreateTransferStatus.EXISTS or s.name.startswith("EXISTS_WITH_")
)
_MISSING_ACCOUNT = frozenset(
    {CreateTransferStatus.DEBIT_ACCOUNT_NOT_FOUND, CreateTransferStatus.CREDIT_ACCOUNT_NOT_FOUND}
)


class LedgerSink(BatchingSink[Transfer]):
    """Buffer transfers and create them in batches; replays are answered ``exists``."""

    step_id = "ledger"

    def __init__(
        self,
        ledger: Ledger,
        run: Run,
        *,
        hooks: StageHooks,
        capacity: int = MAX_BATCH,
        flush_items: int = 128,
        flush_interval_s: float = 0.05,
        on_missing_account: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(max_items=capacity, hooks=hooks)
        if not 1 <= flush_items <= capacity:
            msg = f"flush_items must be in 1..{capacity}, got {flush_items}"
            raise ValueError(msg)
        self.ledger = ledger
        self._run = run
        self.flush_items = flush_items
        self.flush_interval_s = flush_interval_s
        self._on_missing_account = on_missing_account
        self.created = 0
        self.duplicates = 0

    @property
    def flush_due(self) -> bool:
        """True when the buffer must be written now (size or age trigger)."""
        return self.due(self.flush_interval_s, self.flush_items)

    async def put(self, transfer: Transfer) -> None:
        """Buffer one transfer; write the buffer as soon as it reaches ``flush_items``."""
        self.add(transfer)
        if len(self) >= self.flush_items:
            await self.flush()

    async def flush_if_due(self) -> None:
        """For a timer (every ``flush_interval_s``): write the buffer once its oldest item is due."""
        if self.flush_due:
            await self.flush()

    async def run_timer(self, stop: asyncio.Event) -> None:
        """Flush on the age trigger until ``stop`` is set, then flush what is left."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.flush_interval_s / 2)
            await self.flush_if_due()
        await self.flush()

    async def write(self, batch: list[Transfer]) -> None:
        created, duplicates = await self._run(self._write_sync, batch)
        self.created += created
        self.duplicates += duplicates

    def _write_sync(self, batch: list[Transfer]) -> tuple[int, int]:
        statuses: Counter[CreateTransferStatus] = Counter()
        for i in range(0, len(batch), MAX_BATCH):
            for result in self.ledger.create_transfers(batch[i : i + MAX_BATCH]):
                statuses[result.status] += 1
        created = statuses.pop(CreateTransferStatus.CREATED, 0)
        duplicates = sum(statuses.pop(s, 0) for s in DUPLICATE)
        if duplicates:
            logger.debug("ledger: %d of %d transfers were already recorded", duplicates, len(batch))
        if not statuses:
            return created, duplicates
        summary = ", ".join(f"{s.name.lower()} x{n}" for s, n in statuses.most_common())
        if _MISSING_ACCOUNT & statuses.keys():
            if self._on_missing_account is not None:
                self._on_missing_account()
            msg = (
                f"ledger: {sum(statuses.values())} transfers failed ({summary}); accounts will be re-created"
            )
            raise LedgerError(msg)
        msg = f"ledger rejected {sum(statuses.values())} of {len(batch)} transfers: {summary}"
        raise LedgerRequestError(msg)
