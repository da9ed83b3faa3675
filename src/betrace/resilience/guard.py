"""Guarded sink writes: through circuit breakers, into the spool when they cannot be made.

:class:`SpooledWriter` sits between a sink's ``write(batch)`` and the real
write. A write that fails with a retriable error (or finds a breaker open)
is appended to the sink's durable :class:`~betrace.resilience.spool.Spool`
instead, and the batch counts as written: it is fsynced on local disk, so
the stage may acknowledge its input (see docs/reliability.md for why this
keeps exactly-once effects). While the spool holds anything, new batches are
appended behind it so replay keeps the original order. :meth:`drain` — called
before every write and by a worker timer — replays the spool in order once
the gating breakers allow calls; the sinks are idempotent, so a segment
replayed twice (a crash between write and delete) stores nothing twice.

When the spool is full, :meth:`write` does not drop or grow: it keeps
draining and waiting, holding its batch un-acknowledged, while the
:class:`~betrace.resilience.backpressure.Backpressure` source for the spool
has already paused the stage's partitions at 90 % fill.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from betrace.errors import BackpressureError, BetraceError, CircuitOpenError
from betrace.metrics import StageHooks
from betrace.resilience.breakers import Breaker
from betrace.resilience.spool import Spool, batches

logger = logging.getLogger(__name__)

T = TypeVar("T")

Write = Callable[[list[T]], Awaitable[None]]
Encode = Callable[[list[T]], tuple[bytes, int]]
Decode = Callable[[bytes], list[T]]


def spoolable(exc: BaseException) -> bool:
    """A failure that waiting can fix: spool the write instead of failing the stage."""
    if isinstance(exc, CircuitOpenError):
        return True
    if isinstance(exc, BetraceError):
        return exc.retriable and not isinstance(exc, BackpressureError)
    return isinstance(exc, OSError | TimeoutError)


class SpooledWriter(Generic[T]):
    """Write batches directly when possible, durably spool them when not, replay in order."""

    def __init__(
        self,
        *,
        name: str,
        spool: Spool,
        write: Write[T],
        encode: Encode[T],
        decode: Decode[T],
        gates: Sequence[Breaker] = (),
        hooks: StageHooks | None = None,
        replay_batch_items: int = 20_000,
        full_retry_s: float = 0.2,
    ) -> None:
        self.name = name
        self.spool = spool
        self._write = write
        self._encode = encode
        self._decode = decode
        self.gates = list(gates)
        self.hooks = hooks
        self.replay_batch_items = replay_batch_items
        self.full_retry_s = full_retry_s
        self._lock = asyncio.Lock()
        self.spooled = 0
        self.replayed = 0
        self._blocked = False
        self._report()

    def level(self) -> float:
        """Spool fill 0..1 (1 while a batch is held), a :class:`Backpressure` source."""
        return 1.0 if self._blocked else self.spool.fill

    def _gates_open(self) -> bool:
        return all(b.allows_call() for b in self.gates)

    def _report(self) -> None:
        if self.hooks is not None:
            self.hooks.gauge("betrace_spool_depth", self.spool.items, spool=self.name)
            self.hooks.gauge("betrace_spool_bytes", self.spool.size_bytes, spool=self.name)

    async def write(self, batch: list[T]) -> None:
        """Write ``batch`` or spool it; returns once it is stored or durably spooled."""
        if not batch:
            return
        async with self._lock:
            if self.spool.items and self._gates_open():
                await self._drain_locked()
            if not self.spool.items:
                try:
                    await self._write(batch)
                except Exception as exc:
                    if not spoolable(exc):
                        raise
                    logger.warning("%s: write failed, spooling %d items: %s", self.name, len(batch), exc)
                else:
                    return
            await self._spool_locked(batch)

    async def _spool_locked(self, batch: list[T]) -> None:
        payload = self._encode(batch)
        warned = False
        while True:
            try:
                added = await asyncio.to_thread(self.spool.append, [payload])
            except (BackpressureError, OSError) as exc:
                # Full, or the spool's own disk refuses writes: hold the batch (its input
                # stays un-acknowledged, the stage is paused) until replay makes room.
                self._blocked = True
                if not warned:
                    logger.warning("%s: cannot spool, holding the batch: %s", self.name, exc)
                    warned = True
                await asyncio.sleep(self.full_retry_s)
                if self._gates_open():
                    await self._drain_locked()
                    if not self.spool.items:
                        try:
                            await self._write(batch)
                        except Exception as retry_exc:
                            if not spoolable(retry_exc):
                                raise
                        else:
                            self._blocked = False
                            return
                continue
            self._blocked = False
            self.spooled += added
            if self.hooks is not None:
                self.hooks.count("betrace_spooled_total", added, spool=self.name)
            self._report()
            return

    async def drain(self) -> int:
        """Replay the spool in order if the gating breakers allow; return the items replayed."""
        if not self.spool.items or not self._gates_open():
            return 0
        if self._lock.locked():
            # A write holds the lock (and drains itself while it waits): never queue a
            # timer behind it, the timer also applies backpressure.
            return 0
        async with self._lock:
            return await self._drain_locked()

    async def _drain_locked(self) -> int:
        done = 0
        started = time.perf_counter()
        try:
            for seq in self.spool.segment_ids():
                records = await asyncio.to_thread(self.spool.read, seq)
                for chunk in batches(records, self.replay_batch_items):
                    items: list[T] = []
                    for rec in chunk:
                        items.extend(self._decode(rec.payload))
                    await self._write(items)
                    self.spool.ack_record(chunk[-1])
                    n = sum(r.items for r in chunk)
                    done += n
                    if self.hooks is not None:
                        self.hooks.count("betrace_spool_replayed_total", n, spool=self.name)
                await asyncio.to_thread(self.spool.ack_segment, seq)
                self._report()
        except Exception as exc:
            if not spoolable(exc):
                logger.exception("%s: replaying the spool failed; it is kept for the next attempt", self.name)
            else:
                logger.warning("%s: spool replay paused: %s", self.name, exc)
        finally:
            self._report()
        if done:
            self.replayed += done
            logger.warning(
                "%s: replayed %d spooled items in %.2fs; %d still spooled",
                self.name,
                done,
                time.perf_counter() - started,
                self.spool.items,
            )
        return done

    def close(self) -> None:
        self.spool.close()
