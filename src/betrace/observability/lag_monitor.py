"""Periodic consumer-lag measurement inside the worker, exported as metrics."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from betrace.errors import BrokerError
from betrace.metrics import StageHooks
from betrace.streams.lag import LagReader, PartitionLag

logger = logging.getLogger(__name__)


@dataclass
class LagSnapshot:
    """The latest reading, for ``/health/ready`` and ``/v1/stats``."""

    taken_at: float = 0.0
    partitions: list[PartitionLag] = field(default_factory=list)
    error: str | None = None

    def total(self, group: str | None = None) -> int:
        return sum(p.lag for p in self.partitions if group is None or p.group == group)


class LagMonitor:
    """Reads the worker group's lag on its input topics every ``interval_s``."""

    def __init__(
        self,
        brokers: str,
        group: str,
        topics: list[str],
        hooks: StageHooks,
        *,
        threshold: int,
        interval_s: float,
    ) -> None:
        self.group = group
        self.topics = topics
        self.hooks = hooks
        self.threshold = threshold
        self.interval_s = interval_s
        self.snapshot = LagSnapshot()
        self._reader = LagReader(brokers)
        self._started = False

    @property
    def lagging(self) -> bool:
        return self.snapshot.total(self.group) > self.threshold

    async def poll(self) -> LagSnapshot:
        """Take one reading; a broker error is recorded, never raised."""
        try:
            if not self._started:
                await self._reader.start()
                self._started = True
            partitions = await self._reader.lag(self.group, self.topics)
        except BrokerError as exc:
            self.snapshot = LagSnapshot(time.time(), self.snapshot.partitions, str(exc))
            logger.warning("lag monitor: %s", exc)
            return self.snapshot
        for p in partitions:
            labels = {"group": p.group, "topic": p.topic, "partition": str(p.partition)}
            self.hooks.gauge("betrace_consumer_lag", p.lag, **labels)
            self.hooks.gauge("betrace_consumer_end_offset", p.end, **labels)
            if p.committed is not None:
                self.hooks.gauge("betrace_consumer_committed_offset", p.committed, **labels)
        self.snapshot = LagSnapshot(time.time(), partitions, None)
        self.hooks.gauge("betrace_consumer_group_lagging", 1 if self.lagging else 0, group=self.group)
        return self.snapshot

    async def stop(self) -> None:
        if self._started:
            await self._reader.stop()
            self._started = False
