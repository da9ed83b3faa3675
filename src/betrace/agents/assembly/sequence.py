"""``A followed_by B within T`` over a trace's windows, exactly, without keeping its spans.

An A span anchored at ``t`` is followed when some other B span starts in
``[t, t + T]``, i.e. when ``t`` lies in ``[b - T, b]`` for some B start ``b``.
Per trace and rule the windows leave a :class:`SeqState`:

* ``cover``: the union of those intervals over the B spans seen so far,
  kept as sorted, disjoint ``[lo, hi]`` pairs (B starts closer than ``T``
  make one interval, so a trace's cover stays small);
* ``pending``: the A spans no B has followed so far, with their anchors.

A window matches its own A spans against every B of the window (overlap
included, and never a span against itself); what it leaves unmatched is
checked against the cover of the other windows, and its B spans clear the
pending A spans of the others. The result does not depend on how spans fall
into windows or in which order windows are folded: the trace is violated
exactly when some A span was never followed, as on the whole trace.

Both lists are capped (:data:`MAX_PENDING`, :data:`MAX_COVER`): beyond that
the earliest pending A spans are counted as ``lost`` (judged unmatched) and the
closest cover intervals are joined, down to half the cap (judged followed). Both are counted in the
state and named in the signal's message, never silent.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from betrace.rules.batch import BatchContext
from betrace.rules.sequence.compiler import CompiledSequence

MAX_PENDING = 4096
MAX_COVER = 4096


@dataclass(slots=True)
class SeqState:
    """What one trace's windows leave for one sequence rule (see the module docstring)."""

    cover: list[list[int]] = field(default_factory=list)
    pending: list[list[Any]] = field(default_factory=list)  # [anchor_ns, span_id], anchor order
    lost: int = 0  # pending A spans dropped past MAX_PENDING: each unmatched when dropped
    joined: int = 0  # cover intervals joined past MAX_COVER

    def as_json(self) -> dict[str, Any]:
        return {"cv": self.cover, "p": self.pending, "l": self.lost, "j": self.joined}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> SeqState:
        return cls(
            cover=[list(c) for c in doc.get("cv") or ()],
            pending=[list(p) for p in doc.get("p") or ()],
            lost=int(doc.get("l") or 0),
            joined=int(doc.get("j") or 0),
        )

    def copy(self) -> SeqState:
        cover, pending = [list(c) for c in self.cover], [list(p) for p in self.pending]
        return SeqState(cover, pending, self.lost, self.joined)

    @property
    def violated(self) -> bool:
        return bool(self.pending) or self.lost > 0

    def earliest_deadline(self, within_ns: int) -> int | None:
        """When the first pending A span's violation becomes certain, if any is pending."""
        return self.pending[0][0] + within_ns if self.pending else None

    def merge(self, other: SeqState) -> None:
        """Fold ``other`` (windows this state has not seen) into this state.

        Per merge the work is about the size of ``other`` (a window's worth) plus
        ``log`` of this state's: a million-span trace merges ten thousand windows.
        """
        if other.cover and self.pending:
            # Only the pending anchors inside the other's cover span can be cleared.
            first = bisect.bisect_left(self.pending, other.cover[0][0], key=_anchor)
            last = bisect.bisect_right(self.pending, other.cover[-1][1], key=_anchor)
            if first < last:
                kept = [p for p in self.pending[first:last] if not _covered(other.cover, p[0])]
                self.pending[first:last] = kept
        fresh = [p for p in other.pending if not _covered(self.cover, p[0])] if self.cover else other.pending
        if len(fresh) <= 16:
            for p in fresh:
                bisect.insort(self.pending, list(p), key=_anchor)
        else:
            self.pending = sorted([*self.pending, *(list(p) for p in fresh)], key=_anchor)
        if len(self.pending) > MAX_PENDING:
            drop = len(self.pending) - MAX_PENDING
            self.lost += drop
            del self.pending[:drop]
        for lo, hi in other.cover:
            _insert(self.cover, lo, hi)
        if len(self.cover) > MAX_COVER:
            # Down to half the cap at once, so that joining is rare, not every merge.
            self.joined += len(self.cover) - MAX_COVER // 2
            self.cover = _join_closest(self.cover, MAX_COVER // 2)
        self.lost += other.lost
        self.joined += other.joined


def window_states(program: CompiledSequence, ctx: BatchContext, new: pa.Array) -> dict[int, SeqState]:
    """Per window (trace code of ``ctx``) with new A or B spans: what its new rows add."""
    parts = program.run(ctx)
    within = program.ast.within_ns
    out: dict[int, SeqState] = {}
    unmatched = pc.and_(parts.unmatched, new).fill_null(False)
    rows = pc.indices_nonzero(unmatched)
    if len(rows):
        anchors = pc.subtract(pc.take(parts.deadline, rows), within)
        codes = pc.take(ctx.codes, rows).to_pylist()
        ids = pc.take(ctx.column("span_id"), rows).to_pylist()
        for code, anchor, span_id in zip(codes, anchors.to_pylist(), ids, strict=True):
            state = out.get(code)
            if state is None:
                state = out[code] = SeqState()
            state.pending.append([anchor, span_id])
        for state in out.values():
            state.pending.sort(key=_anchor)
    b_rows = pc.indices_nonzero(pc.and_(parts.then, new).fill_null(False))
    if len(b_rows):
        for code, lo, hi in _clusters(ctx, b_rows, within):
            state = out.get(code)
            if state is None:
                state = out[code] = SeqState()
            state.cover.append([lo, hi])
    return out


def _clusters(ctx: BatchContext, b_rows: pa.Array, within: int) -> list[tuple[int, int, int]]:
    """``(code, lo, hi)``: per window, B starts closer than ``within`` as one interval."""
    table = pa.table(
        {"code": pc.take(ctx.codes, b_rows), "t": pc.take(ctx.column("start_ns"), b_rows)}
    ).sort_by([("code", "ascending"), ("t", "ascending")])
    code = table.column("code").combine_chunks()
    t = pc.cast(table.column("t").combine_chunks(), pa.int64())
    n = len(t)
    if n == 1:
        start = t[0].as_py()
        return [(code[0].as_py(), start - within, start)]
    prev_code, prev_t = code.slice(0, n - 1), t.slice(0, n - 1)
    cur_code, cur_t = code.slice(1), t.slice(1)
    breaks = pc.or_(pc.not_equal(cur_code, prev_code), pc.greater(pc.subtract(cur_t, prev_t), within))
    starts = pa.concat_arrays([pa.array([True]), breaks])
    cluster = pc.cumulative_sum(pc.cast(starts, pa.int64()))
    grouped = (
        pa.table({"cluster": cluster, "code": code, "t": t})
        .group_by("cluster", use_threads=False)
        .aggregate([("code", "min"), ("t", "min"), ("t", "max")])
    )
    return [
        (c, lo - within, hi)
        for c, lo, hi in zip(
            grouped.column("code_min").to_pylist(),
            grouped.column("t_min").to_pylist(),
            grouped.column("t_max").to_pylist(),
            strict=True,
        )
    ]


def _anchor(pending: list[Any]) -> int:
    anchor: int = pending[0]
    return anchor


def _covered(cover: list[list[int]], t: int) -> bool:
    i = bisect.bisect_right(cover, t, key=_lo) - 1
    return i >= 0 and t <= cover[i][1]


def _insert(cover: list[list[int]], lo: int, hi: int) -> None:
    """Add ``[lo, hi]`` to sorted, disjoint ``cover``, joining what it overlaps or touches."""
    i = bisect.bisect_left(cover, lo, key=_lo)
    if i > 0 and cover[i - 1][1] + 1 >= lo:
        i -= 1
        lo = cover[i][0]
    j = i
    while j < len(cover) and cover[j][0] <= hi + 1:
        hi = max(hi, cover[j][1])
        j += 1
    cover[i:j] = [[lo, hi]]


def _lo(interval: list[int]) -> int:
    return interval[0]


def _join_closest(cover: list[list[int]], keep: int) -> list[list[int]]:
    """Join neighbours across the smallest gaps until ``keep`` intervals remain."""
    gaps = sorted(range(len(cover) - 1), key=lambda i: cover[i + 1][0] - cover[i][1])
    join = set(gaps[: len(cover) - keep])
    out: list[list[int]] = []
    for i, (lo, hi) in enumerate(cover):
        if out and i - 1 in join:
            out[-1][1] = hi
        else:
            out.append([lo, hi])
    return out
