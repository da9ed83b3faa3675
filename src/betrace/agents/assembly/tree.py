"""Exact TraceQL structure across windows: the part of a trace's span tree a query needs.

A structural query (``{ A } >> { B }``, ``{ A } ~ { B }``, ``{ A } && { B }``, their
negations and unions, aggregates after them) relates spans that may land in
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

Filters may read the trace (``trace:duration``, ``trace:rootName``,
``trace:rootService``, ``trace:id``) and the span's children (``childCount``):
each filter is split into per-span parts, which become bits as windows fold, and
parts that read only the trace or the tree, which are computed on the tree when it
is judged, from the first start, last end and first root span of *all* the
trace's spans (kept or not). A filter chain of that kind (``{ trace:duration > 2s }``)
keeps one span per window plus those passing a span part; with structure or
``childCount`` every span is kept. Value aggregates (``avg(duration)``) and
``by(expr)`` keep, per kept span, the float64 argument or the group value.

Not from the tree (the per-window flag of :mod:`.summary`): a comparison that mixes
span and trace fields (``duration > trace:duration``), aggregates or groups of
``childCount`` or ``trace:`` values, and more than :data:`MAX_FILTERS` per-span
filter parts.
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
from betrace.rules.fields import MaskFn
from betrace.rules.traceql import ast as tq
from betrace.rules.traceql.compiler import Sources, compile_pipeline

#: Spans kept per trace and query (ids, parent ids and filter bits: 33 bytes each).
MAX_TREE_SPANS = 8192
#: Per-span filter parts (bits) per query: one byte per span.
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
    #: Per aggregate argument (``avg(duration)``): n float64 values, then n validity bytes.
    values: list[bytes] = dataclasses.field(default_factory=list)
    #: Per ``by(expr)``: each span's group value.
    keys: list[list[str]] = dataclasses.field(default_factory=list)
    lost: int = 0  # spans past MAX_TREE_SPANS, not kept
    window_hit: bool = False  # past the cap: some later window matched on its own
    #: For ``trace:`` intrinsics, over every span (kept or not): first start, last end,
    #: and the (name, service) of the first root span to arrive.
    start: int | None = None
    end: int | None = None
    root: tuple[str | None, str | None] | None = None

    @property
    def spans(self) -> int:
        return len(self.bits)

    def extend(self, ids: str, parents: str, bits: bytes, values: list[bytes], keys: list[list[str]]) -> None:
        """Keep these spans, up to the cap; count the rest."""
        room = max(0, MAX_TREE_SPANS - self.spans)
        n = len(bits)
        take = min(room, n)
        if take:
            self.ids += ids[: take * _ID]
            self.parents += parents[: take * _ID]
            self.bits += bits[:take]
            if not self.values:
                self.values = [b""] * len(values)
            self.values = [
                old + v[: take * _width(i)]
                for i, (old, v) in enumerate(zip(self.values, values, strict=True))
            ]
            if not self.keys:
                self.keys = [[] for _ in keys]
            for mine, theirs in zip(self.keys, keys, strict=True):
                mine.extend(theirs[:take])
        self.lost += n - take

    def merge(self, other: TreeState) -> None:
        self.extend(other.ids, other.parents, other.bits, other.values, other.keys)
        self.lost += other.lost
        self.window_hit = self.window_hit or other.window_hit
        self.note_trace(other.start, other.end, other.root)

    def note_trace(
        self, start: int | None, end: int | None, root: tuple[str | None, str | None] | None
    ) -> None:
        if start is not None and (self.start is None or start < self.start):
            self.start = start
        if end is not None and (self.end is None or end > self.end):
            self.end = end
        if self.root is None:
            self.root = root

    def copy(self) -> TreeState:
        return dataclasses.replace(self, keys=[list(k) for k in self.keys])

    def as_json(self) -> dict[str, Any]:
        # Optional parts only when present: one entry per closed trace and structural rule.
        doc: dict[str, Any] = {
            "i": self.ids,
            "p": self.parents,
            "b": base64.b64encode(self.bits).decode("ascii"),
        }
        if self.values:
            doc["v"] = [base64.b64encode(v).decode("ascii") for v in self.values]
        if self.keys:
            doc["k"] = self.keys
        if self.lost or self.window_hit:
            doc["l"], doc["w"] = self.lost, self.window_hit
        if self.start is not None:
            doc["ts"], doc["te"], doc["r"] = self.start, self.end, self.root
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> TreeState:
        return cls(
            ids=str(doc["i"]),
            parents=str(doc["p"]),
            bits=base64.b64decode(doc["b"]),
            values=[base64.b64decode(v) for v in doc.get("v", ())],
            keys=[list(k) for k in doc.get("k", ())],
            lost=int(doc.get("l", 0)),
            window_hit=bool(doc.get("w")),
            start=doc.get("ts"),
            end=doc.get("te"),
            root=tuple(doc["r"]) if doc.get("r") else None,  # [name, service]
        )


def _width(i: int) -> int:
    """Bytes per span of value column ``i``: float64 values, then their validity."""
    return 8 if i % 2 == 0 else 1


def _nodes(node: tq.Stage) -> Iterator[tq.Stage]:
    """Every node of a query, operands and pipeline stages included."""
    yield node
    match node:
        case tq.SpansetOp(left=left, right=right):
            yield from _nodes(left)
            yield from _nodes(right)
        case tq.Pipeline(stages=stages):
            for stage in stages:
                yield from _nodes(stage)


def _filters(query: tq.Stage) -> list[tq.Filter]:
    return [n for n in _nodes(query) if isinstance(n, tq.Filter)]


def _ops(query: tq.Stage) -> list[str]:
    return [n.op for n in _nodes(query) if isinstance(n, tq.SpansetOp)]


def _groupings(query: tq.Stage) -> list[fx.Expr]:
    """The expressions of the query's ``by(...)`` stages."""
    return [n.expr for n in _nodes(query) if isinstance(n, tq.By)]


def _arguments(query: tq.Stage) -> list[fx.Expr]:
    """The arguments of the query's value aggregates (``avg(duration)``: ``duration``)."""
    return [
        a.arg
        for n in _nodes(query)
        if isinstance(n, tq.AggregateFilter)
        for a in (n.left, n.right)
        if isinstance(a, tq.Aggregate) and a.arg is not None
    ]


def _supported(node: tq.Stage) -> bool:
    """Spanset expressions and aggregates of per-span values: what the tree can hold."""
    match node:
        case tq.Filter() | tq.NoOp():
            return True
        case tq.SpansetOp(left=left, right=right):
            return _supported(left) and _supported(right)
        case tq.Pipeline(stages=stages):
            return all(_supported(s) for s in stages)
        case tq.AggregateFilter(left=left, right=right):
            return all(
                a.arg is None or not any(_of_tree(f) for f in _reads(a.arg))
                for a in (left, right)
                if isinstance(a, tq.Aggregate)
            )
    # by(expr): groups by a per-span value, kept per span
    return not any(_of_tree(f) for f in _reads(node.expr))


def _reads(expr: fx.Expr) -> Iterator[fx.Field]:
    if isinstance(expr, fx.Field):
        yield expr
    for f in dataclasses.fields(expr):
        value = getattr(expr, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            yield from _reads(value)  # type: ignore[arg-type]  # nested dataclasses are Exprs


def _of_tree(field: fx.Field) -> bool:
    """Fields whose value depends on other spans: the trace's, or the span's children."""
    return field.scope == "trace" or (field.scope == "intrinsic" and field.name == "childCount")


def reads_tree(expr: fx.Expr) -> bool:
    """True when ``expr`` reads the trace or the span's children, not only the span."""
    return any(_of_tree(f) for f in _reads(expr))


def _split(expr: fx.Expr, spans: list[fx.Expr]) -> MaskFn | None:
    """``expr`` as a function of the kept tree: per-span parts become bits (appended to
    ``spans``, computed as windows fold); parts that read only the trace or the tree
    are computed on the tree itself. None when one comparison mixes the two."""
    fields = list(_reads(expr))
    tree_fields = sum(1 for f in fields if _of_tree(f))
    if not tree_fields:
        spans.append(expr)
        bit = 1 << (len(spans) - 1)
        return lambda ctx: pc.not_equal(pc.bit_wise_and(ctx.column("bits"), bit), 0)
    if tree_fields == len(fields):
        return fx.compile_predicate(expr)
    match expr:
        case fx.Logical(op=op, left=left, right=right):
            a, b = _split(left, spans), _split(right, spans)
            if a is None or b is None:
                return None
            combine = pc.and_ if op == "and" else pc.or_
            return lambda ctx: combine(a(ctx), b(ctx))
        case fx.Not(operand=operand):
            inner = _split(operand, spans)
            return None if inner is None else (lambda ctx: pc.invert(inner(ctx)))
    return None


class TreeQuery:
    """A TraceQL query as a function of a trace's kept tree."""

    def __init__(self, query: tq.Pipeline, filters: list[tq.Filter]) -> None:
        spans: list[fx.Expr] = []
        self.leaves: dict[int, MaskFn] = {}  # by id of the filter nodes of ``query`` (alive with it)
        for node in filters:
            leaf = _split(node.expr, spans)
            if leaf is None:
                msg = "a comparison mixes span and trace fields"
                raise ValueError(msg)
            self.leaves[id(node)] = leaf
        self.masks = [fx.compile_predicate(e) for e in spans]  # per bit, over a window
        fields = [f for node in filters for f in _reads(node.expr)]
        self.needs_trace = any(f.scope == "trace" for f in fields)
        #: Only span filters in a chain: any span without bits stands for all others.
        self.chain = all(isinstance(st, tq.Filter | tq.NoOp) for st in query.stages)
        self.keep_all = (
            any(op in _NEEDS_ALL for op in _ops(query))
            or any(_is_all(node) for node in _filters(query))
            or any(f.name == "childCount" for f in fields if f.scope == "intrinsic")
            or (any(_of_tree(f) for f in fields) and not self.chain)
        )
        #: A chain reading the trace: keep one span per window even when it passes no span part.
        self.representative = not self.keep_all and any(_of_tree(f) for f in fields)
        args = _arguments(query)
        self.numbers = [fx.compile_value(arg) for arg in args]  # per argument, over a window
        column = {id(arg): f"v{j}" for j, arg in enumerate(args)}
        groupings = _groupings(query)
        self.group_keys = [Sources().group_key(expr) for expr in groupings]  # per by(), over a window
        column |= {id(expr): f"k{j}" for j, expr in enumerate(groupings)}
        self.run = compile_pipeline(
            query,
            Sources(
                leaf=lambda node: self.leaves[id(node)],
                number=lambda arg: lambda ctx: ctx.column(column[id(arg)]),
                group_key=lambda expr: lambda ctx: ctx.column(column[id(expr)]),
            ),
        )

    @classmethod
    def of(cls, compiled: Any) -> TreeQuery | None:
        if not isinstance(compiled, CompiledTraceQLRule):
            return None
        query = compiled.query
        if not _supported(query):
            return None  # by() and value aggregates: not from the tree
        filters = [n for n in _filters(query) if not _is_all(n)]
        per_span = not any(_of_tree(f) for n in filters for f in _reads(n.expr))
        if per_span and all(isinstance(st, tq.Filter | tq.NoOp) for st in query.stages):
            return None  # span filters alone are exact per window
        spans: list[fx.Expr] = []
        if any(_split(n.expr, spans) is None for n in filters) or len(spans) > MAX_FILTERS:
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
    new = new.fill_null(False)
    keep = new if query.keep_all else pc.and_(new, pc.not_equal(bits, 0))
    if query.representative:
        first_new = ctx.group_reduce(ctx.arange(ctx.n), new, "min").drop_null()
        keep = pc.or_(keep, ctx.rows_mask(first_new))
    rows = pc.indices_nonzero(keep)
    touched: set[str] = set()
    if len(rows) == 0:
        return touched
    codes = pc.take(ctx.codes, rows)
    ids = _fixed(pc.take(ctx.column("span_id"), rows))
    parents = _fixed(pc.take(ctx.column("parent_span_id"), rows))
    flat = _raw(pc.take(bits, rows), 1)
    values: list[bytes] = []
    for number in query.numbers:
        num = number(ctx).num
        if num is None:  # no span has a numeric value
            values += [bytes(8 * len(rows)), bytes(len(rows))]
            continue
        kept = pc.take(pc.cast(num, pa.float64()), rows)
        values += [_raw(kept, 8), _raw(pc.cast(pc.is_valid(kept), pa.uint8()), 1)]
    keys = [pc.take(key(ctx), rows).to_pylist() for key in query.group_keys]
    per_window = _trace_values(ctx, new) if query.needs_trace else None
    # Windows are contiguous in the table, so their codes come in runs.
    runs = pc.run_end_encode(codes)
    widths = [_width(i) for i in range(len(values))]
    at_cap: set[int] = set()
    start = 0
    for code, end in zip(runs.values.to_pylist(), runs.run_ends.to_pylist(), strict=True):
        trace = traces[code]
        tree = tree_of(trace)
        run_values = [v[start * w : end * w] for v, w in zip(values, widths, strict=True)] if values else []
        run_keys = [k[start:end] for k in keys] if keys else []
        if not tree.bits and end - start <= MAX_TREE_SPANS:  # the usual case: a first window
            tree.ids, tree.parents, tree.bits, tree.values, tree.keys = (
                ids[start * _ID : end * _ID],
                parents[start * _ID : end * _ID],
                flat[start:end],
                run_values,
                run_keys,
            )
        else:
            tree.extend(
                ids[start * _ID : end * _ID],
                parents[start * _ID : end * _ID],
                flat[start:end],
                run_values,
                run_keys,
            )
            if tree.lost or (full is not None and full(trace)):
                at_cap.add(code)
        if per_window is not None:
            tree.note_trace(*per_window[code])
        touched.add(trace)
        start = end
    if at_cap:
        _judge_windows(compiled, ctx, at_cap, traces, tree_of)
    return touched


def _raw(array: pa.Array, width: int) -> bytes:
    """The data buffer of a fixed-width array (``width`` bytes per value) as bytes."""
    raw: bytes = array.buffers()[1].to_pybytes()
    return raw[array.offset * width : (array.offset + len(array)) * width]


def _trace_values(
    ctx: BatchContext, new: pa.Array
) -> list[tuple[int | None, int | None, tuple[str | None, str | None] | None]]:
    """Per window: first start, last end and first root (name, service) of its new rows."""
    roots = pc.and_(new, ctx.is_root())
    columns = [
        ctx.group_reduce(ctx.column("start_ns"), new, "min").to_pylist(),
        ctx.group_reduce(ctx.column("end_ns"), new, "max").to_pylist(),
        ctx.group_reduce(ctx.column("name"), roots, "first").to_pylist(),
        ctx.group_reduce(ctx.column("service"), roots, "first").to_pylist(),
        ctx.group_any(roots).to_pylist(),
    ]
    return [
        (start, end, (name, service) if has_root else None)
        for start, end, name, service, has_root in zip(*columns, strict=True)
    ]


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


class _TreeContext(BatchContext):
    """The kept trees of many traces; trace intrinsics come from what every span left."""

    def __init__(self, table: pa.Table, per_trace: dict[str, pa.Array]) -> None:
        super().__init__(table)
        self._per_trace = per_trace

    def trace_value(self, name: str) -> pa.Array:
        return self.spread(self._per_trace[name])


def settle(
    query: TreeQuery, trace_ids: list[str], trees: list[TreeState], max_evidence: int
) -> list[tuple[bool, list[str]]]:
    """Run the query over each trace's tree at once: per tree, (matched, some matching span ids)."""
    kept: list[TreeState] = []
    names: list[str] = []
    offsets = [0]
    for trace_id, state in zip(trace_ids, trees, strict=True):
        if state.bits:
            kept.append(state)
            names.append(trace_id)
            offsets.append(offsets[-1] + len(state.bits))
    if not kept:
        return [(s.window_hit, []) for s in trees]
    n = offsets[-1]
    codes = pc.list_parent_indices(pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.nulls(n)))
    bits = pa.py_buffer(b"".join(s.bits for s in kept))
    table = pa.table(
        {
            "trace_id": pc.take(pa.array(names, pa.string()), codes),
            "span_id": _strings("".join(s.ids for s in kept), n),
            "parent_span_id": _strings("".join(s.parents for s in kept), n),
            "bits": pa.Array.from_buffers(pa.uint8(), n, [None, bits]),
            **{
                f"v{j}": _floats(
                    b"".join(s.values[2 * j] for s in kept), b"".join(s.values[2 * j + 1] for s in kept), n
                )
                for j in range(len(query.numbers))
            },
            **{
                f"k{j}": pa.array([k for s in kept for k in s.keys[j]], pa.string())
                for j in range(len(query.group_keys))
            },
        }
    )
    per_trace: dict[str, pa.Array] = {}
    if query.needs_trace:
        per_trace = {
            "duration": pa.array(
                [None if s.start is None or s.end is None else s.end - s.start for s in kept], pa.int64()
            ),
            "rootName": pa.array([s.root[0] if s.root else None for s in kept], pa.string()),
            "rootService": pa.array([s.root[1] if s.root else None for s in kept], pa.string()),
        }
    ctx = _TreeContext(table, per_trace)  # trace codes 0.. in the order of ``kept``
    mask = query.run(ctx).mask
    matched = ctx.group_any(mask)
    cited: dict[str, list[str]] = {}
    if pc.any(matched).as_py():
        cited = {v.trace_id: list(v.span_ids[:max_evidence]) for v in ctx.violations(matched, mask, "")}
    # ``kept`` is ``trees`` without the empty ones, in order.
    hits = iter(zip(names, matched.to_pylist(), strict=True))
    out: list[tuple[bool, list[str]]] = []
    for state in trees:
        if not state.bits:
            out.append((state.window_hit, []))
            continue
        name, hit = next(hits)
        out.append((True, cited[name]) if hit else (state.window_hit, []))
    return out


def _floats(data: bytes, valid: bytes, n: int) -> pa.Array:
    values = pa.Array.from_buffers(pa.float64(), n, [None, pa.py_buffer(data)])
    flags = pa.Array.from_buffers(pa.uint8(), n, [None, pa.py_buffer(valid)])
    return pc.if_else(pc.not_equal(flags, 0), values, pa.scalar(None, pa.float64()))


def _strings(joined: str, n: int) -> pa.Array:
    fixed = pa.Array.from_buffers(pa.binary(_ID), n, [None, pa.py_buffer(joined.encode("ascii"))])
    return pc.cast(pc.cast(fixed, pa.binary()), pa.string())
