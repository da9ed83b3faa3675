"""Assemble stage: group spans per trace and close traces after an idle timeout.

State is columnar: one pending table holds every span of every live trace,
tagged with the sequence number of the message it came from. Python work is
per trace (last-seen times), never per span. A message is acknowledged only
when none of its spans is pending any more, so a crash replays open traces
instead of losing them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from betrace.metrics import StageHooks
from betrace.streams.schemas import SPAN_SCHEMA

logger = logging.getLogger(__name__)

STEP_ID = "assemble"
_SEQ = "__seq"
_EMPTY = SPAN_SCHEMA.empty_table()


@dataclass(slots=True)
class ClosedTraces:
    """Traces that are complete, with the message sequence numbers now free."""

    spans: pa.Table
    traces: int
    released: list[int]


class TraceAssembler:
    """Hold spans of live traces until each trace has been idle long enough."""

    step_id = STEP_ID

    def __init__(
        self,
        *,
        idle_timeout_s: float,
        max_trace_age_s: float,
        max_live_traces: int,
        hooks: StageHooks,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.idle_timeout_s = idle_timeout_s
        self.max_trace_age_s = max_trace_age_s
        self.max_live_traces = max_live_traces
        self.hooks = hooks
        self.clock = clock
        self._chunks: list[pa.Table] = []
        self._last_seen: dict[str, float] = {}
        self._first_seen: dict[str, float] = {}
        self._open_seqs: set[int] = set()

    @property
    def live_traces(self) -> int:
        return len(self._last_seen)

    def add(self, spans: pa.Table, seq: int) -> None:
        """Take the spans of one message; ``seq`` identifies it for release."""
        now = self.clock()
        self._open_seqs.add(seq)
        if spans.num_rows == 0:
            return
        self._chunks.append(spans.append_column(_SEQ, pa.array([seq] * spans.num_rows, pa.int64())))
        last, first = self._last_seen, self._first_seen
        for trace_id in pc.unique(spans.column("trace_id")).to_pylist():
            if trace_id not in first:
                first[trace_id] = now
            last[trace_id] = now

    def close_due(self, *, flush_all: bool = False) -> ClosedTraces | None:
        """Close idle, too old and (past the live limit) the oldest traces."""
        now = self.clock()
        idle_before = now - self.idle_timeout_s
        age_before = now - self.max_trace_age_s
        due: dict[str, str] = {}
        for trace_id, seen in self._last_seen.items():
            if flush_all or seen <= idle_before:
                due[trace_id] = "idle"
            elif self._first_seen[trace_id] <= age_before:
                due[trace_id] = "max_age"
        excess = len(self._last_seen) - len(due) - self.max_live_traces
        if excess > 0:
            # Dicts keep insertion order, so the first keys are the oldest traces.
            for trace_id in self._first_seen:
                if excess <= 0:
                    break
                if trace_id not in due:
                    due[trace_id] = "live_limit"
                    excess -= 1
        if not due and not self._open_seqs:
            return None
        closed = self._extract(list(due))
        for trace_id, cause in due.items():
            del self._last_seen[trace_id]
            del self._first_seen[trace_id]
            self.hooks.count("betrace_traces_closed_total", stage=STEP_ID, cause=cause)
        self.hooks.gauge("betrace_live_traces", len(self._last_seen), stage=STEP_ID)
        still_open = self._pending_seqs()
        released = sorted(self._open_seqs - still_open)
        self._open_seqs = still_open
        if closed.num_rows == 0 and not released:
            return None
        return ClosedTraces(spans=closed, traces=len(due), released=released)

    def _extract(self, trace_ids: list[str]) -> pa.Table:
        if not self._chunks or not trace_ids:
            return _EMPTY
        pending = pa.concat_tables(self._chunks).combine_chunks()
        mask = pc.is_in(pending.column("trace_id"), value_set=pa.array(trace_ids, pa.string()))
        closed = pending.filter(mask)
        rest = pending.filter(pc.invert(mask))
        self._chunks = [rest] if rest.num_rows else []
        return closed.drop_columns([_SEQ])

    def _pending_seqs(self) -> set[int]:
        if not self._chunks:
            return set()
        return {s for chunk in self._chunks for s in pc.unique(chunk.column(_SEQ)).to_pylist()}
