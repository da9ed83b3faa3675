"""Backpressure: bounded buffers report their fill; saturated stages pause their partitions.

Every source (a sink's buffer, a spool) registers a ``level()`` function
returning 0..1 and the topics whose consumption feeds it. A source becomes
*saturated* at ``high`` (90 %) and stays so until it falls below ``low``
(50 %) — hysteresis, so a stage does not flap between paused and running.
:meth:`Backpressure.apply` (a worker timer) pauses the assigned partitions of a
saturated source's topics through faust's consumer and resumes them once it
recovers. The OTLP/HTTP receiver asks :meth:`Backpressure.is_saturated` to
answer 503 with ``Retry-After``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from betrace.config import Settings
    from betrace.metrics import StageHooks

logger = logging.getLogger(__name__)

Level = Callable[[], float]


@dataclass
class _Source:
    name: str
    level: Level
    topics: frozenset[str]
    saturated: bool = False
    paused: set[Any] = field(default_factory=set)


class Backpressure:
    """Fill levels of every bounded buffer, with hysteresis and partition pausing."""

    def __init__(self, *, high: float = 0.9, low: float = 0.5, hooks: StageHooks | None = None) -> None:
        if not 0 <= low < high <= 1:
            msg = f"backpressure watermarks must satisfy 0 <= low < high <= 1, got low={low} high={high}"
            raise ValueError(msg)
        self.high = high
        self.low = low
        self.hooks = hooks
        self._sources: dict[str, _Source] = {}
        self._lock = threading.Lock()

    @staticmethod
    def from_settings(settings: Settings, hooks: StageHooks | None = None) -> Backpressure:
        r = settings.resilience
        return Backpressure(high=r.pause_high_watermark, low=r.resume_low_watermark, hooks=hooks)

    def register(self, name: str, level: Level, topics: Iterable[str] = ()) -> None:
        """Watch ``level`` (0..1); pause ``topics`` while it is saturated."""
        with self._lock:
            self._sources[name] = _Source(name, level, frozenset(topics))

    def _read(self, src: _Source) -> float:
        try:
            value = float(src.level())
        except Exception:
            logger.exception("backpressure: level of %s failed", src.name)
            return 0.0
        # Hysteresis: enter at high, leave below low.
        if src.saturated and value < self.low:
            src.saturated = False
        elif not src.saturated and value >= self.high:
            src.saturated = True
        return value

    def levels(self) -> dict[str, float]:
        with self._lock:
            return {name: self._read(src) for name, src in self._sources.items()}

    def level(self) -> float:
        """The fullest source, 0..1."""
        return max(self.levels().values(), default=0.0)

    def is_saturated(self) -> bool:
        """True while any source is above ``high`` (and until it drops below ``low``)."""
        self.levels()
        with self._lock:
            return any(src.saturated for src in self._sources.values())

    def reasons(self) -> list[str]:
        levels = self.levels()
        with self._lock:
            return [
                f"{name} is {levels[name]:.0%} full (pauses at {self.high:.0%}, resumes below {self.low:.0%})"
                for name, src in sorted(self._sources.items())
                if src.saturated
            ]

    def paused(self) -> set[Any]:
        with self._lock:
            return set().union(*(src.paused for src in self._sources.values()))

    def apply(self, consumer: Any) -> None:
        """Pause/resume partitions on a faust consumer (``app.consumer``) to match the levels."""
        self.levels()
        try:
            assigned = set(consumer.assignment())
        except Exception:  # noqa: BLE001 - faust raises several types before the consumer starts
            # Not started or mid-rebalance: nothing to pause yet.
            return
        with self._lock:
            for src in self._sources.values():
                if not src.topics:
                    continue
                # Revoked partitions are no longer ours to resume.
                src.paused &= assigned
                if src.saturated:
                    new = {tp for tp in assigned if tp.topic in src.topics} - src.paused
                    if new:
                        consumer.pause_partitions(new)
                        src.paused |= new
                        logger.warning(
                            "backpressure: %s saturated; paused %d partitions of %s",
                            src.name,
                            len(new),
                            ",".join(sorted(src.topics)),
                        )
                elif src.paused:
                    still = set().union(
                        *(o.paused for o in self._sources.values() if o is not src and o.saturated)
                    )
                    resume = src.paused - still
                    if resume:
                        consumer.resume_partitions(resume)
                        logger.warning(
                            "backpressure: %s recovered; resumed %d partitions", src.name, len(resume)
                        )
                    src.paused.clear()
            total = len(set().union(*(s.paused for s in self._sources.values())))
        if self.hooks is not None:
            self.hooks.gauge("betrace_paused_partitions", total, stage="all")
