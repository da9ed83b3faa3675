"""Exact TraceQL structure across windows: the part of a trace's span tree a query needs.

A structural query (``{ A } >> { B }``, ``{ A } ~ { B }``, ``{ A } && { B }``, their
negations and unions, count comparisons after them) relates spans that may land in
windows far apart: OpenTelemetry exports a parent after its children, so the root
of a long trace usually arrives in its last window. Window plus overlap cannot see
that. Instead, each trace keeps per query a *tree*: for each span its id, its parent's
id and one bit per span filter of the query, taken from the new rows of every window
as it is folded. The verdict is the query itself, run over the tree of every trace
the tick touched (:func:`settle`), so it is the verdict over the whole trace, however
the spans arrived and were cut into windows.

What is kept: every span when the query walks ancestors (``>>``, ``<<``), looks for
siblings (``~``; their parent may match no filter) or has an empty filter ``{ }``,
with their negations and unions; otherwise only the spans that pass one of its
filters (a child or parent relation needs no other span).
At most :data:`MAX_TREE_SPANS` spans per trace and query are kept (33 bytes each);
past that, the extra spans are counted (``lost``) and each later window is also
judged on its own, with its overlap, as before this module existed; the signal
message says so.

Filters must be per-span predicates: ``trace:`` intrinsics and ``childCount`` read
other spans of the window, so such queries keep the per-window flag (see
:mod:`.summary`). Queries with more than :data:`MAX_FILTERS` filters, ``by()`` or
value aggregates (``avg``, ``sum``...) do too.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from betrace.rules import fields as fx
from betrace.rules.batch import BatchContext
from betrace.rules.engine import CompiledTraceQLRule
from betrace.rules.traceql import ast as tq
from betrace.rules.traceql.compiler import compile_pipeline

#: Spans kept per trace and query (ids, parent ids and filter bits: 33 bytes each).
MAX_TREE_SPANS = 8192
#: Filter bits per span: one byte.
MAX_FILTERS = 8
_ID = 16  # characters per id: the 16 hex digits of an OTLP span id
_NO_PARENT = "-" * _ID  # never a span id: matches nothing
#: Relations that read spans outside their operands: ancestor paths, and the shared parent of siblings.
_NEEDS_ALL = frozenset({">>", "<<", "!>>", "!<<", "&>>", "&<<", "~", "!~", "&~"})


@dataclass(slots=True)
class TreeState:
    """One trace's kept spans for one query (fixed-width, concatenated)."""

    ids: str = ""  # n x 16 characters
    parents: str = ""  # n x 16 characters, _NO_PARENT for a root
    bits: bytes = b""  # n bytes: bit i = the span passes filter i
    lost: int = 0  # spans past MAX_TREE_SPANS, not kept
    window_hit: bool = False  # past the cap: some later window matched on its own

    @property
    def spans(self) -> int:
        return len(self.bits)

    def extend(self, ids: str, parents: str, bits: bytes) -> None:
        """Keep these spans, up to the cap; count the rest."""
        room = max(0, MAX_TREE_SPANS - self.spans)
        n = len(bits)
        take = min(room, n)
        if take:
            self.ids += ids[: take * _ID]
            self.parents += parents[: take * _ID]
            self.bits += bits[:take]
        self.lost += n - take

    def merge(self, other: TreeState) -> None:
        self.extend(other.ids, other.parents, other.bits)
        self.lost += other.lost
        self.window_hit = self.window_hit or other.window_hit

    def copy(self) -> TreeState:
        return dataclasses.replace(self)

    def as_json(self) -> dict[str, Any]:
        return {
            "i": self.ids,
            "p": self.parents,
            "b": base64.b64encode(self.bits).decode("ascii"),
            "l": self.lost,
            "w": self.window_hit,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> TreeState:
        return cls(
            ids=str(doc["i"]),
            parents=str(doc["p"]),
            bits=base64.b64decode(doc["b"]),
            lost=int(doc.get("l", 0)),
            window_hit=bool(doc.get("w")),
        )


def _filters(node: tq.Stage) -> Iterator[tq.Filter]:
    match node:
        case tq.Filter():
            yield node
        case tq.SpansetOp(left=left, right=right):
            yield from _filters(left)
            yield from _filters(right)
        case tq.Pipeline(stages=stages):
            for stage in stages:
                yield from _filters(stage)


def _ops(node: tq.Stage) -> Iterator[str]:
    match node:
        case tq.SpansetOp(op=op, left=left, right=right):
            yield op
            yield from _ops(left)
            yield from _ops(right)
        case tq.Pipeline(stages=stages):
            for stage in stages:
                yield from _ops(stage)


def _supported(node: tq.Stage) -> bool:
    """Only spanset expressions and ``count()`` comparisons: the tree has no other values."""
    match node:
        case tq.Filter() | tq.NoOp():
            return True
        case tq.SpansetOp(left=left, right=right):
            return _supported(left) and _supported(right)
        case tq.Pipeline(stages=stages):
            return all(_supported(s) for s in stages)
        case tq.AggregateFilter(left=left, right=right):
            return left.func == "count" and (not isinstance(right, tq.Aggregate) or right.func == "count")
    return False  # by(...): groups by values the tree does not keep


def _per_span(expr: fx.Expr) -> bool:
    """True when ``expr`` reads only the span itself (not its trace or its children)."""
    if isinstance(expr, fx.Field) and (
        expr.scope == "trace" or (expr.scope == "intrinsic" and expr.name == "childCount")
    ):
        return False
    for f in dataclasses.fields(expr):
        value = getattr(expr, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type) and not _per_span(value):  # type: ignore[arg-type]  # nested dataclasses are Exprs
            return False
    return True


class TreeQuery:
    """A structural query as a function of a trace's kept tree."""

    def __init__(self, query: tq.Pipeline, filters: list[tq.Filter]) -> None:
        self.index = {id(node): i for i, node in enumerate(filters)}  # nodes of ``query``: alive with it
        self.masks = [fx.compile_predicate(node.expr) for node in filters]
        self.keep_all = any(op in _NEEDS_ALL for op in _ops(query)) or any(
            isinstance(node.expr, fx.Const) and node.expr.value is True for node in _filters(query)
        )
        self.run = compile_pipeline(query, leaf=self._bit)

    def _bit(self, node: tq.Filter) -> Callable[[BatchContext], pa.Array]:
        bit = 1 << self.index[id(node)]
        return lambda ctx: pc.not_equal(pc.bit_wise_and(ctx.column("bits"), bit), 0)

    @classmethod
    def of(cls, compiled: Any) -> TreeQuery | None:
        if not isinstance(compiled, CompiledTraceQLRule):
            return None
        query = compiled.query
        if all(isinstance(s, tq.Filter | tq.NoOp) for s in query.stages) or not _supported(query):
            return None  # span filters alone are exact per window; by() and value aggregates are not here
        filters = [n for n in _filters(query) if not _is_all(n)]
        if len(filters) > MAX_FILTERS or not all(_per_span(n.expr) for n in filters):
            return None
        return cls(query, filters)


def _is_all(node: tq.Filter) -> bool:
    return isinstance(node.expr, fx.Const) and node.expr.value is True


def fold(
    query: TreeQuery,
    compiled: CompiledTraceQLRule,
    ctx: BatchContext,
    *,
    traces: list[str],
    new: pa.Array,
    tree_of: Callable[[str], TreeState],
    full: Callable[[str], bool] | None = None,
) -> set[str]:
    """Add the new rows of the windows in ``ctx`` to their traces' trees; the traces touched.

    ``traces`` names the trace of each window (trace code of ``ctx``); ``tree_of``
    returns a trace's tree, created on first use. ``full`` says whether a trace's
    tree is at its cap, when ``tree_of`` gives a fresh tree to be merged later.
    """
    zero = pa.scalar(0, pa.uint8())
    bits = pa.repeat(zero, ctx.n)
    for i, mask in enumerate(query.masks):
        bits = pc.bit_wise_or(
            bits, pc.if_else(mask(ctx).fill_null(False), pa.scalar(1 << i, pa.uint8()), zero)
        )
    keep = new if query.keep_all else pc.and_(new, pc.not_equal(bits, 0))
    rows = pc.indices_nonzero(keep.fill_null(False))
    touched: set[str] = set()
    if len(rows) == 0:
        return touched
    codes = pc.take(ctx.codes, rows)
    ids = _fixed(pc.take(ctx.column("span_id"), rows))
    parents = _fixed(pc.take(ctx.column("parent_span_id"), rows))
    kept_bits = pc.take(bits, rows)
    flat = kept_bits.buffers()[1].to_pybytes()[kept_bits.offset : kept_bits.offset + len(kept_bits)]
    # Windows are contiguous in the table, so their codes come in runs.
    runs = pc.run_end_encode(codes)
    at_cap: set[int] = set()
    start = 0
    for code, end in zip(runs.values.to_pylist(), runs.run_ends.to_pylist(), strict=True):
        trace = traces[code]
        tree = tree_of(trace)
        if not tree.bits and end - start <= MAX_TREE_SPANS:  # the usual case: a first window
            tree.ids, tree.parents, tree.bits = (
                ids[start * _ID : end * _ID],
                parents[start * _ID : end * _ID],
                flat[start:end],
            )
        else:
            tree.extend(ids[start * _ID : end * _ID], parents[start * _ID : end * _ID], flat[start:end])
            if tree.lost or (full is not None and full(trace)):
                at_cap.add(code)
        touched.add(trace)
        start = end
    if at_cap:
        _judge_windows(compiled, ctx, at_cap, traces, tree_of)
    return touched


def _judge_windows(
    compiled: CompiledTraceQLRule,
    ctx: BatchContext,
    codes: set[int],
    traces: list[str],
    tree_of: Callable[[str], TreeState],
) -> None:
    """Past the cap, each window of a full tree is also judged alone (with its overlap)."""
    keep = pc.is_in(ctx.codes, value_set=pa.array(sorted(codes), ctx.codes.type))
    code_of = {w: code for code, w in enumerate(ctx.trace_ids.to_pylist())}
    for violation in compiled.evaluate(ctx.table.filter(keep)):
        tree_of(traces[code_of[violation.trace_id]]).window_hit = True


def _fixed(ids: pa.Array) -> str:
    """``ids`` as one string of 16 characters each (parents: :data:`_NO_PARENT` when none)."""
    ids = ids.fill_null(_NO_PARENT)
    lengths = pc.binary_length(ids)
    fixed = (
        pc.min_max(lengths).as_py() == {"min": _ID, "max": _ID} and pc.all(pc.string_is_ascii(ids)).as_py()
    )
    if len(ids) and not fixed:
        # Not OTLP span ids (ingest guarantees 16 hex digits): a stable 16-digit stand-in.
        ids = pa.array([_stand_in(v) for v in ids.to_pylist()], pa.string())
    listed = pa.ListArray.from_arrays(pa.array([0, len(ids)], pa.int32()), ids)
    joined: str = pc.binary_join(listed, "")[0].as_py()
    return joined


def _stand_in(value: str) -> str:
    if len(value) == _ID and value.isascii():
        return value
    if not value:
        return _NO_PARENT
    return hashlib.blake2b(value.encode(), digest_size=_ID // 2).hexdigest()


def settle(query: TreeQuery, trees: list[TreeState], max_evidence: int) -> list[tuple[bool, list[str]]]:
    """Run the query over each tree at once: per tree, (matched, some matching span ids)."""
    kept: list[TreeState] = []
    offsets = [0]
    for state in trees:
        if state.bits:
            kept.append(state)
            offsets.append(offsets[-1] + len(state.bits))
    if not kept:
        return [(s.window_hit, []) for s in trees]
    n = offsets[-1]
    codes = pc.list_parent_indices(pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.nulls(n)))
    bits = pa.py_buffer(b"".join(s.bits for s in kept))
    table = pa.table(
        {
            "trace_id": codes,
            "span_id": _strings("".join(s.ids for s in kept), n),
            "parent_span_id": _strings("".join(s.parents for s in kept), n),
            "bits": pa.Array.from_buffers(pa.uint8(), n, [None, bits]),
        }
    )
    ctx = BatchContext(table)  # trace codes 0.. in the order of ``kept``
    mask = query.run(ctx).mask
    matched = ctx.group_any(mask)
    cited: dict[int, list[str]] = {}
    if pc.any(matched).as_py():
        cited = {int(v.trace_id): list(v.span_ids[:max_evidence]) for v in ctx.violations(matched, mask, "")}
    verdicts = {id(state): (i in cited, cited.get(i, [])) for i, state in enumerate(kept)}
    out = []
    for state in trees:
        hit, evidence = verdicts.get(id(state), (False, []))
        out.append((hit or state.window_hit, evidence))
    return out


def _strings(joined: str, n: int) -> pa.Array:
    fixed = pa.Array.from_buffers(pa.binary(_ID), n, [None, pa.py_buffer(joined.encode("ascii"))])
    return pc.cast(pc.cast(fixed, pa.binary()), pa.string())
