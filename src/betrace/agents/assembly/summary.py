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
  per-span predicate. Selectors with TraceQL structure (parent/child,
  siblings) see the window plus its overlap only.
* ``traceql`` and ``sequence`` rules keep one flag: violated in some window
  (window plus overlap as context). Exact for span filters; structural
  relations, ``followed_by`` and aggregates only within window + overlap.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from betrace.rules.batch import BatchContext
from betrace.rules.dsl import compiler as dslc
from betrace.rules.dsl import parser as dslp
from betrace.rules.engine import CompiledDslRule
from betrace.rules.model import CompiledRule

#: Span ids kept per rule and trace as evidence of a windowed violation.
MAX_EVIDENCE = 8
WINDOW_SEP = "/"

_CMP: dict[str, Callable[[float, float], bool]] = {
    "=": operator.eq, "!=": operator.ne, ">": operator.gt, ">=": operator.ge,
    "<": operator.lt, "<=": operator.le,
}  # fmt: skip

RulesFor = Callable[[str], list[CompiledRule]]


def rule_key(compiled: CompiledRule) -> str:
    """Summaries are per rule *version*: a new version starts from nothing."""
    return f"{compiled.rule.id}@{compiled.rule.version}"


@dataclass(slots=True)
class RuleSummary:
    """What survives of one trace for one rule after its windows were dropped."""

    counts: list[int] | None = None  # DSL: one count per leaf selector
    violated: bool = False  # other languages: violated in some window
    evidence: list[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> RuleSummary:
        return cls(counts=doc.get("c"), violated=bool(doc.get("v")), evidence=list(doc.get("e") or ()))


Summaries = dict[str, RuleSummary]


def summaries_json(summaries: Summaries) -> dict[str, Any]:
    """The JSON form of ``summaries`` (read back by :meth:`RuleSummary.from_json`).

    One comprehension, no call per rule: this runs for every closed trace.
    """
    return {k: {"c": s.counts, "v": s.violated, "e": s.evidence} for k, s in summaries.items()}


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


_leaves_cache: dict[int, tuple[CompiledRule, _DslLeaves]] = {}


def _leaves(compiled: CompiledDslRule) -> _DslLeaves:
    hit = _leaves_cache.get(id(compiled))
    if hit is None or hit[0] is not compiled:
        if len(_leaves_cache) > 10_000:  # rule reloads replace compiled objects
            _leaves_cache.clear()
        hit = (compiled, _DslLeaves(compiled.program.ast))
        _leaves_cache[id(compiled)] = hit
    return hit[1]


def window_table(spans: pa.Table, window_id: str) -> pa.Table:
    """``spans`` as one pseudo-trace named ``window_id`` for the rule engine."""
    col = spans.schema.get_field_index("trace_id")
    return spans.set_column(col, "trace_id", pa.repeat(pa.scalar(window_id), spans.num_rows))


def trace_of(window_id: str) -> str:
    return window_id.rpartition(WINDOW_SEP)[0]


def fold_windows(
    compiled_rules: list[CompiledRule], windows: pa.Table, new: pa.Array, into: dict[str, Summaries]
) -> None:
    """Add the windows in ``windows`` (one tenant) to the per-trace summaries in ``into``."""
    if windows.num_rows == 0 or not compiled_rules:
        return
    traces: list[str] = []  # per window (trace code of the batch context): its trace
    for compiled in compiled_rules:
        key = rule_key(compiled)
        if isinstance(compiled, CompiledDslRule):
            ctx = compiled.context(windows)
            if not traces:
                traces = [w.rpartition(WINDOW_SEP)[0] for w in ctx.trace_ids.to_pylist()]  # trace_of
            _fold_dsl(compiled, key, ctx, traces, new=new, into=into)
        else:
            for violation in compiled.evaluate(windows):
                summary = into.setdefault(trace_of(violation.trace_id), {}).setdefault(key, RuleSummary())
                summary.violated = True
                room = MAX_EVIDENCE - len(summary.evidence)
                if room > 0:
                    summary.evidence.extend(violation.span_ids[:room])


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
        # Best effort and bounded: a few cited spans, never a per-span loop over a window.
        hits = pc.indices_nonzero(evidence_mask)[: 4 * MAX_EVIDENCE]
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
    return summary.violated


def message(compiled: CompiledRule, windows: int) -> str:
    if isinstance(compiled, CompiledDslRule):
        ast = compiled.program.ast
        parts = [f"when {{ {ast.when.text} }} matched"]
        if ast.always is not None:
            parts.append(f"always {{ {ast.always.text} }}")
        if ast.never is not None:
            parts.append(f"never {{ {ast.never.text} }}")
        return f"{' / '.join(parts)}: violated over {windows} window(s)"
    return f"{compiled.rule.language} rule matched in a window ({windows} window(s) evaluated)"
