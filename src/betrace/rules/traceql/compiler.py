"""Compile TraceQL syntax trees into closures over a :class:`BatchContext`.

A spanset is a boolean mask over every span of the batch plus the grouping
its aggregates use (traces, or ``by(...)`` groups). Evaluating a pipeline on a
batch of many traces at once is therefore a fixed sequence of Arrow kernels;
the query matches a trace when its final spanset has a span in that trace.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from betrace.rules import fields as f
from betrace.rules.batch import BatchContext, Grouping, KeyUse
from betrace.rules.structure import RELATIONS
from betrace.rules.traceql import ast

_REDUCERS = {"avg": "mean", "min": "min", "max": "max", "sum": "sum"}
_CMP = {
    "=": pc.equal, "!=": pc.not_equal, ">": pc.greater, ">=": pc.greater_equal,
    "<": pc.less, "<=": pc.less_equal,
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Spanset:
    mask: pa.Array
    grouping: Grouping | None = None


SpansetFn = Callable[[BatchContext, Spanset], Spanset]


def _predicate(node: ast.Filter) -> Callable[[BatchContext], pa.Array]:
    return f.compile_predicate(node.expr)


def _number(arg: f.Expr) -> Callable[[BatchContext], pa.Array | None]:
    value = f.compile_value(arg)
    return lambda ctx: value(ctx).num


def _group_key(expr: f.Expr) -> Callable[[BatchContext], pa.Array]:
    value = f.compile_value(expr)

    def key(ctx: BatchContext) -> pa.Array:
        typed = value(ctx)
        out = pa.repeat(pa.scalar("\x00nil"), ctx.n)
        for col in (typed.flag, typed.num, typed.text):
            if col is not None:
                out = pc.coalesce(pc.cast(col, pa.string()), out)
        return out

    return key


@dataclass(frozen=True, slots=True)
class Sources:
    """Where a query's span filters (masks) and aggregate arguments (numbers) come from.

    By default from the batch's columns; the assembler runs the same query over a
    trace's kept tree, whose masks and numbers were taken as its windows were
    folded (``assembly/tree.py``).
    """

    leaf: Callable[[ast.Filter], Callable[[BatchContext], pa.Array]] = _predicate
    number: Callable[[f.Expr], Callable[[BatchContext], pa.Array | None]] = _number
    #: ``by(expr)``: per span, the group's value as a string ("\x00nil" when none).
    group_key: Callable[[f.Expr], Callable[[BatchContext], pa.Array]] = _group_key


def compile_pipeline(
    node: ast.SpansetExpr, sources: Sources | None = None
) -> Callable[[BatchContext], Spanset]:
    """Compile a query; the result maps a batch to the final spanset."""
    run = _compile(node, sources or Sources())
    return lambda ctx: run(ctx, Spanset(ctx.all_true))


def _compile(node: ast.SpansetExpr, src: Sources) -> SpansetFn:
    match node:
        case ast.Filter(expr=f.Const(value=True)):
            return lambda ctx, current: current
        case ast.Filter():
            predicate = src.leaf(node)
            return lambda ctx, current: Spanset(pc.and_(current.mask, predicate(ctx)), current.grouping)
        case ast.SpansetOp(op=op, left=left, right=right):
            return _compile_op(op, _compile(left, src), _compile(right, src))
        case ast.Pipeline(stages=stages):
            steps = [_compile_stage(stage, src) for stage in stages]

            def pipeline(ctx: BatchContext, current: Spanset) -> Spanset:
                for step in steps:
                    current = step(ctx, current)
                return current

            return pipeline


def _compile_op(op: str, left: SpansetFn, right: SpansetFn) -> SpansetFn:
    if op == "&&":

        def both(ctx: BatchContext, current: Spanset) -> Spanset:
            a, b = left(ctx, current).mask, right(ctx, current).mask
            in_both = pc.and_(ctx.group_any(a), ctx.group_any(b))
            return Spanset(pc.and_(pc.or_(a, b), ctx.spread(in_both)))

        return both
    if op == "||":
        return lambda ctx, current: Spanset(pc.or_(left(ctx, current).mask, right(ctx, current).mask))
    relation = RELATIONS[op]
    return lambda ctx, current: Spanset(relation(ctx, left(ctx, current).mask, right(ctx, current).mask))


def _compile_stage(stage: ast.Stage, src: Sources) -> SpansetFn:
    match stage:
        case ast.NoOp():
            return lambda ctx, current: current
        case ast.By(expr=expr):
            return _compile_by(src.group_key(expr))
        case ast.AggregateFilter(op=op, left=left, right=right):
            return _compile_aggregate_filter(op, left, right, src)
        case _:
            return _compile(stage, src)


def _compile_by(group_key: Callable[[BatchContext], pa.Array]) -> SpansetFn:
    def by(ctx: BatchContext, current: Spanset) -> Spanset:
        combined = pc.binary_join_element_wise(pc.cast(ctx.codes, pa.string()), group_key(ctx), "\x1f")
        encoded = pc.dictionary_encode(combined)
        return Spanset(current.mask, Grouping(encoded.indices, len(encoded.dictionary)))

    return by


AggregateFn = Callable[[BatchContext, Spanset], pa.Array]


def _compile_aggregate(node: ast.Aggregate, src: Sources) -> AggregateFn:
    if node.func == "count":
        return lambda ctx, s: ctx.group_count(s.mask, s.grouping)
    assert node.arg is not None
    value = src.number(node.arg)
    func = _REDUCERS[node.func]

    def reduce(ctx: BatchContext, s: Spanset) -> pa.Array:
        num = value(ctx)
        if num is None:
            size = (s.grouping or ctx.traces).size
            return pa.nulls(size, pa.float64())
        return ctx.group_reduce(pc.cast(num, pa.float64()), s.mask, func, s.grouping)

    return reduce


def _compile_aggregate_filter(
    op: str, left: ast.Aggregate, right: ast.Aggregate | float, src: Sources
) -> SpansetFn:
    lhs = _compile_aggregate(left, src)
    rhs = None if isinstance(right, float) else _compile_aggregate(right, src)
    compare = _CMP[op]

    def aggregate_filter(ctx: BatchContext, current: Spanset) -> Spanset:
        a = lhs(ctx, current)
        b = right if rhs is None else rhs(ctx, current)
        keep = compare(a, b).fill_null(False)
        mask = pc.and_(current.mask, ctx.spread(keep, current.grouping))
        return Spanset(mask, current.grouping)

    return aggregate_filter


def attribute_keys(node: ast.Stage) -> set[KeyUse]:
    """Every attribute key a query reads (for one-pass extraction), on any span."""
    match node:
        case ast.Filter(expr=expr) | ast.By(expr=expr):
            return f.key_uses(expr)
        case ast.SpansetOp(left=left, right=right):
            return attribute_keys(left) | attribute_keys(right)
        case ast.Pipeline(stages=stages):
            return set().union(*(attribute_keys(s) for s in stages))
        case ast.AggregateFilter(left=left, right=right):
            keys = f.key_uses(left.arg) if left.arg is not None else set()
            if isinstance(right, ast.Aggregate) and right.arg is not None:
                keys |= f.key_uses(right.arg)
            return keys
    return set()
