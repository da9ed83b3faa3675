"""Per-rule window summaries: judge a trace from its windows without keeping its spans.

Every window is evaluated for many traces at once: the windows of one tenant
are stacked into one table whose ``trace_id`` column is replaced by a window
id (``<trace>/<n>``), so each window is a trace of its own for the rule
engine, and a boolean ``new`` array marks the rows that were not carried over
from the previous window.

Exactness (see docs in the package ``__init__``):

* ``betrace`` DSL rules keep one count per span selector (leaf), summed over
  the *new* rows of every window, so each span is counted once. ``when`` /
  ``always`` / ``never`` with ``exists``, ``count(..) op N``,
  ``count(..) op count(..)``, ``and`` / ``or`` / ``not`` are then re-derived
  from the counts: exact for any trace length, as long as each selector is a
  per-span predicate.
* ``traceql`` queries of one span filter and one aggregate comparison
  (``{ cond } | count() > 15``, ``{ } | avg(duration) > 40ms``; ``min``, ``max``,
  ``sum`` too) keep the filter's span count and the aggregate's count, sum, min
  and max over the *new* rows: exact for any trace length, when the filter reads
  no ``trace:`` intrinsic.
* ``sequence`` rules (``A followed_by B within T``) keep the cover of the B
  spans' start times and the A spans not yet followed (:mod:`.sequence`): exact
  for any trace length and any split into windows.
* Every other ``traceql`` query with more than span filters (structure ``>>``,
  ``>``, ``<<``, ``<``, ``~`` and their negations and unions, ``&&``, ``||``,
  ``trace:`` intrinsics, ``childCount``, ``by()``, aggregates) keeps the part of
  the span tree it needs (:mod:`.tree`) and is re-run over it: exact for any
  trace length up to the tree's cap.
* The rest (span filters alone, and what :mod:`.tree` lists as not from the
  tree) keeps one flag: violated in some window (window plus overlap as
  context). Exact for span filters.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc

from betrace.agents.assembly import tree as tr
from betrace.agents.assembly.sequence import SeqState, window_states
from betrace.rules import fields as fx
from betrace.rules.batch import BatchContext
from betrace.rules.dsl import compiler as dslc
from betrace.rules.dsl import parser as dslp
from betrace.rules.engine import CompiledDslRule, CompiledSequenceRule, CompiledTraceQLRule
from betrace.rules.model import CompiledRule
from betrace.rules.traceql import ast as tq

#: Span ids kept per rule and trace as evidence of a windowed violation.
MAX_EVIDENCE = 8
WINDOW_SEP = "/"

_CMP: dict[str, Callable[[float, float], bool]] = {
    "=": operator.eq, "!=": operator.ne, ">": operator.gt, ">=": operator.ge,
    "<": operator.lt, "<=": operator.le,
}  # fmt: skip

RulesFor = Callable[[str], list[CompiledRule]]
#: A tree's span ids that start with this name the rule whose tree holds them (ids are hex).
_SAME_TREE = "="


def rule_key(compiled: CompiledRule) -> str:
    """Summaries are per rule *version*: a new version starts from nothing."""
    return f"{compiled.rule.id}@{compiled.rule.version}"


@dataclass(slots=True)
class RuleSummary:
    """What survives of one trace for one rule after its windows were dropped."""

    counts: list[int] | None = None  # DSL: one count per leaf selector
    violated: bool = False  # other TraceQL queries: violated in some window
    evidence: list[str] = field(default_factory=list)
    #: TraceQL aggregate queries: [filter spans, values, sum, min, max] (see :class:`_AggregateQuery`).
    agg: list[float | None] | None = None
    seq: SeqState | None = None  # sequence rules (see :mod:`.sequence`)
    tree: tr.TreeState | None = None  # structural TraceQL (see :mod:`.tree`); ``violated`` is its verdict

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> RuleSummary:
        return cls(
            counts=doc.get("c"),
            violated=bool(doc.get("v")),
            evidence=list(doc.get("e") or ()),
            agg=doc.get("a"),
            seq=SeqState.from_json(doc["s"]) if doc.get("s") else None,
            tree=tr.TreeState.from_json(doc["t"]) if doc.get("t") else None,
        )


Summaries = dict[str, RuleSummary]


def summaries_json(summaries: Summaries) -> dict[str, Any]:
    """The JSON form of ``summaries`` (read back by :meth:`RuleSummary.from_json`).

    Fields at their defaults are left out: most rules of a trace match nothing,
    and their nulls were a third of every decision record (measured on the load
    harness's 20-rule pack: 2,044 -> 1,474 bytes). A plain loop, as it runs for
    every closed trace, is also faster than a comprehension over field pairs.
    """
    out: dict[str, Any] = {}
    trees: dict[str, str] = {}  # span ids of a tree -> the first rule that wrote them
    for k, s in summaries.items():
        doc: dict[str, Any] = {}
        if s.counts is not None:
            doc["c"] = s.counts
        if s.violated:
            doc["v"] = True
        if s.evidence:
            doc["e"] = s.evidence
        if s.agg is not None:
            doc["a"] = s.agg
        if s.seq is not None:
            doc["s"] = s.seq.as_json()
        if s.tree is not None:
            doc["t"] = tree = s.tree.as_json()
            # Rules that keep every span of the trace keep the same ids and parents:
            # written once per decision, then referred to by rule key.
            first = trees.setdefault(tree["i"], k)
            if first != k and tree["i"]:
                tree["i"] = _SAME_TREE + first
                if tree["p"] == out[first]["t"]["p"]:
                    del tree["p"]
        out[k] = doc
    return out


def summaries_from_json(doc: dict[str, Any]) -> Summaries:
    """The inverse of :func:`summaries_json`."""
    out: Summaries = {}
    for k, v in doc.items():
        tree = v.get("t")
        if tree is not None and tree["i"].startswith(_SAME_TREE):
            first = out[tree["i"][len(_SAME_TREE) :]].tree
            if first is None:
                msg = f"rule {k} refers to the tree of a rule that has none: {tree['i']!r}"
                raise ValueError(msg)
            v = {**v, "t": {**tree, "i": first.ids, "p": tree.get("p", first.parents)}}  # noqa: PLW2901
        out[k] = RuleSummary.from_json(v)
    return out


class _DslLeaves:
    """The leaf selectors of one DSL rule and its verdict as a function of their counts."""

    def __init__(self, ast: dslp.DslRule) -> None:
        self.refs: list[dslp.SpanRef] = []
        when = self._walk(ast.when.cond)
        # The when-clause is walked first, so its leaves come first: they are the evidence.
        self.when_leaves = frozenset(range(len(self.refs)))
        always = self._walk(ast.always.cond) if ast.always else None
        never = self._walk(ast.never.cond) if ast.never else None
        self.masks = [dslc.compile_selector(ref) for ref in self.refs]

        def violated(counts: list[int]) -> bool:
            if not when(counts):
                return False
            return (always is not None and not always(counts)) or (never is not None and never(counts))

        self.violated = violated

    def _leaf(self, ref: dslp.SpanRef) -> int:
        self.refs.append(ref)
        return len(self.refs) - 1

    def _walk(self, cond: dslp.Cond) -> Callable[[list[int]], bool]:
        match cond:
            case dslp.Exists(ref=ref):
                i = self._leaf(ref)
                return lambda c: c[i] > 0
            case dslp.CountCompare(op=op, left=left, right=right):
                cmp = _CMP[op]
                a = self._leaf(left)
                if isinstance(right, dslp.SpanRef):
                    b = self._leaf(right)
                    return lambda c: cmp(c[a], c[b])
                bound = float(right)
                return lambda c: cmp(c[a], bound)
            case dslp.NotCond(operand=operand):
                inner = self._walk(operand)
                return lambda c: not inner(c)
            case dslp.BoolCond(op="and", left=left, right=right):
                lhs, rhs = self._walk(left), self._walk(right)
                return lambda c: lhs(c) and rhs(c)
            case dslp.BoolCond(left=left, right=right):
                lhs, rhs = self._walk(left), self._walk(right)
                return lambda c: lhs(c) or rhs(c)


class _AggregateQuery:
    """``{ cond } | agg(...) op N``: the query as a function of per-trace running totals.

    The totals are ``[spans, values, sum, min, max]``: spans that pass ``cond``, and
    the count, sum, min and max of the aggregate's numeric argument over them (for
    ``count()``, of nothing). The query matches when some span passes and the
    aggregate of the totals passes the comparison, as on the whole trace.
    """

    def __init__(self, cond: fx.Expr, aggregate: tq.Aggregate, op: str, bound: float) -> None:
        self.cond = None if isinstance(cond, fx.Const) and cond.value is True else fx.compile_predicate(cond)
        self.value = None if aggregate.arg is None else fx.compile_value(aggregate.arg)
        self.func = aggregate.func
        self.compare = _CMP[op]
        self.bound = bound

    @classmethod
    def of(cls, compiled: CompiledRule) -> _AggregateQuery | None:
        if not isinstance(compiled, CompiledTraceQLRule):
            return None
        match compiled.query:
            case tq.Pipeline(
                stages=(
                    tq.Filter(expr=cond),
                    tq.AggregateFilter(op=op, left=aggregate, right=float() as bound),
                )
            ):
                if tr.reads_tree(cond) or (aggregate.arg is not None and tr.reads_tree(aggregate.arg)):
                    return None  # trace:duration, childCount: per window, not per trace
                return cls(cond, aggregate, op, bound)
        return None

    def fold(self, ctx: BatchContext, new: pa.Array) -> tuple[pa.Array, list[list[float | None]]]:
        """The mask of spans passing ``cond`` and, per window, the totals of its new rows."""
        mask = ctx.all_true if self.cond is None else self.cond(ctx)
        mask = pc.and_(mask, new).fill_null(False)
        spans = ctx.group_count(mask).to_pylist()
        if self.value is None:
            return mask, [[n, 0, 0.0, None, None] for n in spans]
        num = self.value(ctx).num
        if num is None:
            return mask, [[n, 0, 0.0, None, None] for n in spans]
        num = pc.cast(num, pa.float64())
        valid = pc.and_(mask, pc.is_valid(num))
        columns = [
            ctx.group_count(valid).to_pylist(),
            ctx.group_reduce(num, valid, "sum").to_pylist(),
            ctx.group_reduce(num, valid, "min").to_pylist(),
            ctx.group_reduce(num, valid, "max").to_pylist(),
        ]
        return mask, [
            [n, values, total or 0.0, lo, hi]
            for n, values, total, lo, hi in zip(spans, *columns, strict=True)
        ]

    def matched(self, totals: list[float | None]) -> bool:
        spans, values, total, lo, hi = totals
        if not spans:
            return False
        if self.func == "count":
            value: float | None = spans
        elif not values:
            value = None
        else:
            value = {"sum": total, "avg": (total or 0.0) / values, "min": lo, "max": hi}[self.func]
        return value is not None and not math.isnan(value) and self.compare(value, self.bound)


def add_totals(into: list[float | None], totals: list[float | None]) -> None:
    """Add one window pass's aggregate totals to a trace's (see :class:`_AggregateQuery`)."""
    into[0] = (into[0] or 0) + (totals[0] or 0)
    into[1] = (into[1] or 0) + (totals[1] or 0)
    into[2] = (into[2] or 0.0) + (totals[2] or 0.0)
    for i, pick in ((3, min), (4, max)):
        a, b = into[i], totals[i]
        into[i] = b if a is None else a if b is None else pick(a, b)


def _aggregate(compiled: CompiledRule) -> _AggregateQuery | None:
    return _per_rule(_aggregates_cache, compiled, _AggregateQuery.of)


def tree_query(compiled: CompiledRule) -> tr.TreeQuery | None:
    """The structural query of ``compiled`` when it is judged from trees (:mod:`.tree`)."""
    if _aggregate(compiled) is not None:
        return None
    return _per_rule(_trees_cache, compiled, tr.TreeQuery.of)


_T = TypeVar("_T")
#: Per compiled rule (by identity; rule reloads replace compiled objects): its derived query.
_aggregates_cache: dict[int, tuple[CompiledRule, Any]] = {}
_leaves_cache: dict[int, tuple[CompiledRule, Any]] = {}
_trees_cache: dict[int, tuple[CompiledRule, Any]] = {}


def _per_rule(cache: dict[int, tuple[CompiledRule, Any]], compiled: Any, build: Callable[[Any], _T]) -> _T:
    hit = cache.get(id(compiled))
    if hit is None or hit[0] is not compiled:
        if len(cache) > 10_000:
            cache.clear()
        hit = (compiled, build(compiled))
        cache[id(compiled)] = hit
    value: _T = hit[1]
    return value


def _leaves(compiled: CompiledDslRule) -> _DslLeaves:
    return _per_rule(_leaves_cache, compiled, lambda c: _DslLeaves(c.program.ast))


def window_table(spans: pa.Table, window_id: str) -> pa.Table:
    """``spans`` as one pseudo-trace named ``window_id`` for the rule engine."""
    col = spans.schema.get_field_index("trace_id")
    return spans.set_column(col, "trace_id", pa.repeat(pa.scalar(window_id), spans.num_rows))


def trace_of(window_id: str) -> str:
    return window_id.rpartition(WINDOW_SEP)[0]


def fold_windows(
    compiled_rules: list[CompiledRule],
    windows: pa.Table,
    new: pa.Array,
    into: dict[str, Summaries],
    *,
    settle: bool = True,
    full: Callable[[str], bool] | None = None,
) -> None:
    """Add the windows in ``windows`` (one tenant) to the per-trace summaries in ``into``.

    ``settle=False`` leaves the verdicts of structural queries to the caller
    (:func:`settle_trees`), for summaries that are merged elsewhere first; ``full``
    then says which traces' trees are at their cap (see :func:`.tree.fold`).
    """
    if windows.num_rows == 0 or not compiled_rules:
        return
    traces: list[str] = []  # per window (trace code of the batch context): its trace
    for compiled in compiled_rules:
        key = rule_key(compiled)
        if isinstance(compiled, CompiledDslRule):
            ctx = compiled.context(windows)
            traces = traces or _window_traces(ctx)
            _fold_dsl(compiled, key, ctx, traces, new=new, into=into)
        elif (query := _aggregate(compiled)) is not None:
            ctx = compiled.context(windows)  # type: ignore[attr-defined]  # a CompiledTraceQLRule
            traces = traces or _window_traces(ctx)
            _fold_aggregate(query, key, ctx, traces, new=new, into=into)
        elif isinstance(compiled, CompiledSequenceRule):
            ctx = compiled.context(windows)
            traces = traces or _window_traces(ctx)
            for code, part in window_states(compiled.program, ctx, new).items():
                summary = into.setdefault(traces[code], {}).setdefault(key, RuleSummary())
                add_sequence(summary, part)
        elif (structural := tree_query(compiled)) is not None:
            ctx = compiled.context(windows)  # type: ignore[attr-defined]  # a CompiledTraceQLRule
            traces = traces or _window_traces(ctx)

            def tree_of(trace_id: str, key: str = key) -> tr.TreeState:
                per_rule = into.get(trace_id)
                if per_rule is None:
                    per_rule = into[trace_id] = {}
                summary = per_rule.get(key)
                if summary is None:
                    tree = tr.TreeState()
                    per_rule[key] = RuleSummary(tree=tree)
                    return tree
                if summary.tree is None:
                    summary.tree = tr.TreeState()
                return summary.tree

            touched = tr.fold(
                structural,
                compiled,  # type: ignore[arg-type]  # a CompiledTraceQLRule
                ctx,
                traces=traces,
                new=new,
                tree_of=tree_of,
                full=full,
            )
            if settle:
                settle_trees(structural, key, touched, into)
        else:
            for violation in compiled.evaluate(windows):
                summary = into.setdefault(trace_of(violation.trace_id), {}).setdefault(key, RuleSummary())
                summary.violated = True
                room = MAX_EVIDENCE - len(summary.evidence)
                if room > 0:
                    summary.evidence.extend(violation.span_ids[:room])


def settle_trees(query: tr.TreeQuery, key: str, traces: Iterable[str], into: dict[str, Summaries]) -> None:
    """Judge ``traces`` for one structural rule from their whole trees (:func:`.tree.settle`)."""
    summaries, ids, trees = [], [], []
    for trace_id in traces:
        summary = into[trace_id].get(key) if trace_id in into else None
        if summary is not None and summary.tree is not None:
            summaries.append(summary)
            ids.append(trace_id)
            trees.append(summary.tree)
    verdicts = tr.settle(query, ids, trees, MAX_EVIDENCE)
    for summary, (hit, evidence) in zip(summaries, verdicts, strict=True):
        # Not sticky: ``!>`` and friends can stop matching when a missing span arrives.
        summary.violated, summary.evidence = hit, evidence


def _window_traces(ctx: BatchContext) -> list[str]:
    """Per window (trace code of ``ctx``): its trace (:func:`trace_of`, without a call each)."""
    return [w.rpartition(WINDOW_SEP)[0] for w in ctx.trace_ids.to_pylist()]


def add_sequence(summary: RuleSummary, part: SeqState) -> None:
    """Fold windows' sequence state into a summary; its evidence: the first A spans pending."""
    if summary.seq is None:
        summary.seq = part.copy()
    else:
        summary.seq.merge(part)
    summary.evidence = [p[1] for p in summary.seq.pending[:MAX_EVIDENCE]]


def _fold_dsl(
    compiled: CompiledDslRule,
    key: str,
    ctx: BatchContext,
    traces: list[str],
    *,
    new: pa.Array,
    into: dict[str, Summaries],
) -> None:
    leaves = _leaves(compiled)
    per_leaf: list[list[int]] = []
    evidence_mask: pa.Array | None = None
    for i, mask_fn in enumerate(leaves.masks):
        mask = pc.and_(mask_fn(ctx), new).fill_null(False)
        per_leaf.append(ctx.group_count(mask).to_pylist())
        if i in leaves.when_leaves:
            evidence_mask = mask if evidence_mask is None else pc.or_(evidence_mask, mask)
    # One pass over the windows, the counts of all leaves at once (most summaries are new).
    for trace_id, counts in zip(traces, zip(*per_leaf, strict=True), strict=True):
        per_trace = into.get(trace_id)
        if per_trace is None:
            per_trace = into[trace_id] = {}
        summary = per_trace.get(key)
        if summary is None:
            per_trace[key] = RuleSummary(counts=list(counts))
        elif summary.counts is None:
            summary.counts = list(counts)
        else:
            for i, n in enumerate(counts):
                summary.counts[i] += n
    if evidence_mask is not None:
        _add_evidence(ctx, evidence_mask, traces, key, into)


def _fold_aggregate(
    query: _AggregateQuery,
    key: str,
    ctx: BatchContext,
    traces: list[str],
    *,
    new: pa.Array,
    into: dict[str, Summaries],
) -> None:
    mask, per_window = query.fold(ctx, new)
    for trace_id, totals in zip(traces, per_window, strict=True):
        summary = into.setdefault(trace_id, {}).setdefault(key, RuleSummary())
        if summary.agg is None:
            summary.agg = totals
        else:
            add_totals(summary.agg, totals)
    _add_evidence(ctx, mask, traces, key, into)


def _add_evidence(
    ctx: BatchContext, mask: pa.Array, traces: list[str], key: str, into: dict[str, Summaries]
) -> None:
    # Best effort and bounded: a few cited spans, never a per-span loop over a window.
    hits = pc.indices_nonzero(mask)[: 4 * MAX_EVIDENCE]
    codes = pc.take(ctx.codes, hits).to_pylist()
    ids = pc.take(ctx.column("span_id"), hits).to_pylist()
    for code, span_id in zip(codes, ids, strict=True):
        summary = into[traces[code]][key]
        if len(summary.evidence) < MAX_EVIDENCE:
            summary.evidence.append(span_id)


def violated(compiled: CompiledRule, summary: RuleSummary | None) -> bool:
    """The verdict of a whole trace from its summary."""
    if summary is None:
        return False
    if isinstance(compiled, CompiledDslRule) and summary.counts is not None:
        return _leaves(compiled).violated(summary.counts)
    if summary.agg is not None and (query := _aggregate(compiled)) is not None:
        return query.matched(summary.agg)
    if summary.seq is not None:
        return summary.seq.violated
    return summary.violated


def _unmatched(summary: RuleSummary | None) -> str:
    seq = summary.seq if summary is not None else None
    if seq is None:
        return "unmatched"
    text = f"{len(seq.pending) + seq.lost} unmatched"
    if seq.lost:
        text += f", {seq.lost} of them past the {len(seq.pending)} kept"
    if seq.joined:
        text += f", {seq.joined} cover interval(s) joined"
    return text


def message(compiled: CompiledRule, windows: int, summary: RuleSummary | None = None) -> str:
    if isinstance(compiled, CompiledDslRule):
        ast = compiled.program.ast
        parts = [f"when {{ {ast.when.text} }} matched"]
        if ast.always is not None:
            parts.append(f"always {{ {ast.always.text} }}")
        if ast.never is not None:
            parts.append(f"never {{ {ast.never.text} }}")
        return f"{' / '.join(parts)}: violated over {windows} window(s)"
    if _aggregate(compiled) is not None:
        return f"TraceQL query matched over {windows} window(s): {' '.join(compiled.rule.expression.split())}"
    if summary is not None and summary.tree is not None:
        tree = summary.tree
        scope = f"the whole trace ({tree.spans} span(s) kept)"
        if tree.lost:
            scope = (
                f"the first {tree.spans} kept span(s); {tree.lost} later span(s) past the cap"
                " judged per window"
            )
        return (
            f"TraceQL query matched over {scope}, {windows} window(s):"
            f" {' '.join(compiled.rule.expression.split())}"
        )
    if isinstance(compiled, CompiledSequenceRule):
        return f"{compiled.program.message()} ({_unmatched(summary)} over {windows} window(s))"
    return f"{compiled.rule.language} rule matched in a window ({windows} window(s) evaluated)"
