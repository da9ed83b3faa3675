"""The one sink contract: ``add`` items, ``write(batch)``, ``flush``.

As in quix-streams, a batch leaves the buffer whether or not its write
succeeds: a failed write is not retried from memory but replayed from Kafka,
because offsets are committed only after every sink has flushed. A full
buffer raises :class:`BackpressureError` instead of growing.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Generic, TypeVar

from betrace.errors import BackpressureError
from betrace.metrics import StageHooks

logger = logging.getLogger(__name__)

T = TypeVar("T")
K = TypeVar("K")


class BatchingSink(abc.ABC, Generic[T]):
    """Buffer items, write them as one batch on :meth:`flush`."""

    step_id: str = "sink"

    def __init__(self, *, max_items: int, hooks: StageHooks) -> None:
        if max_items < 1:
            msg = f"max_items must be >= 1, got {max_items}"
            raise ValueError(msg)
        self.max_items = max_items
        self.hooks = hooks
        self._batch: list[T] = []
        self._size = 0
        self._first_added: float | None = None
        self._flush_lock = asyncio.Lock()

    def __len__(self) -> int:
        return self._size

    @property
    def full(self) -> bool:
        return self._size >= self.max_items

    def due(self, max_age_s: float, max_items: int | None = None) -> bool:
        """Holding ``max_items`` (default: full), or an item added ``max_age_s`` ago or earlier."""
        if self._first_added is None:
            return False
        if self._size >= (self.max_items if max_items is None else max_items):
            return True
        return time.monotonic() - self._first_added >= max_age_s

    def add(self, item: T, size: int = 1) -> None:
        """Buffer ``item`` (worth ``size`` rows); raise when the buffer is full."""
        if self.full:
            msg = f"sink {self.step_id} holds {self._size} rows (max {self.max_items}); flush first"
            raise BackpressureError(msg)
        if self._first_added is None:
            self._first_added = time.monotonic()
        self._batch.append(item)
        self._size += size

    async def flush(self) -> None:
        """Write what is buffered; the buffer is empty afterwards, success or not.

        The buffer is taken before the write awaits, so items added meanwhile (a
        timer flush racing an agent's ``add``) wait for the next flush instead of
        being cleared with a batch they were never part of.
        """
        async with self._flush_lock:
            if not self._batch:
                return
            batch, size = self._batch, self._size
            self._batch, self._size, self._first_added = [], 0, None
            await self._write_counted(batch, size)

    async def _write_counted(self, batch: list[T], size: int) -> None:
        started = time.perf_counter()
        await self.write(batch)
        self.hooks.count("betrace_sink_rows_total", size, sink=self.step_id)
        self.hooks.observe("betrace_sink_flush_seconds", time.perf_counter() - started, sink=self.step_id)

    @abc.abstractmethod
    async def write(self, batch: list[T]) -> None:
        """Persist ``batch`` durably or raise; called by :meth:`flush` only."""


class RowWatermarks(Generic[K]):
    """Tokens (the Kafka events rows came in) released once every row they brought is written.

    A sink that writes part of its buffer (:meth:`SpanStoreSink.flush_aligned`) writes
    each key's rows in the order they were added, so one running count per key is
    enough: a token waits until the written count of each of its keys reaches the
    count its rows brought that key to.
    """

    def __init__(self) -> None:
        self._added: dict[str, int] = {}
        self._written: dict[str, int] = {}
        self._held: list[tuple[K, dict[str, int]]] = []

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, token: K, rows: Mapping[str, int]) -> None:
        """``token`` brought ``rows[key]`` rows of each key."""
        ends = {}
        for key, n in rows.items():
            self._added[key] = ends[key] = self._added.get(key, 0) + n
        self._held.append((token, ends))

    def written(self, rows: Mapping[str, int]) -> list[K]:
        """The first ``rows[key]`` still buffered rows of each key were written; the tokens done."""
        for key, n in rows.items():
            self._written[key] = self._written.get(key, 0) + n
        return self._release()

    def written_all(self) -> list[K]:
        """Everything buffered was written; every token."""
        self._written = dict(self._added)
        return self._release()

    def forget(self) -> list[K]:
        """A write failed and the buffer was dropped; every token, none of them done."""
        tokens = [token for token, _ in self._held]
        self._held, self._added, self._written = [], {}, {}
        return tokens

    def _release(self) -> list[K]:
        written = self._written
        done: list[K] = []
        kept: list[tuple[K, dict[str, int]]] = []
        for token, ends in self._held:
            if all(written.get(key, 0) >= end for key, end in ends.items()):
                done.append(token)
            else:
                kept.append((token, ends))
        self._held = kept
        if not kept:  # nothing waits: restart the counts
            self._added, self._written = {}, {}
        return done
