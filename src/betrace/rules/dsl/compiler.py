"""Compile BeTrace DSL rules into vectorised per-trace verdicts.

Every condition evaluates, for the whole batch at once, to a per-trace
boolean (``value``) and a per-span mask of the spans that made it true
(``evidence``, only where ``value`` holds), which become the violation's
span ids and the ``explain`` output.

A rule is violated in a trace when ``when`` holds and either ``always`` does
not hold or ``never`` holds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from betrace.rules import fields as f
from betrace.rules.batch import BatchContext, KeyUse
from betrace.rules.dsl import parser as p
from betrace.rules.traceql import compiler as tqc

_CMP = {
    "=": pc.equal, "!=": pc.not_equal, ">": pc.greater, ">=": pc.greater_equal,
    "<": pc.less, "<=": pc.less_equal,
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class CondResult:
    value: pa.Array  # per trace
    evidence: pa.Array  # per span


CondFn = Callable[[BatchContext], CondResult]
MaskFn = Callable[[BatchContext], pa.Array]


def compile_selector(ref: p.SpanRef) -> MaskFn:
    """Mask of the spans a selector designates."""
    if ref.spanset is not None:
        pipeline = tqc.compile_pipeline(ref.spanset)
        return lambda ctx: pipeline(ctx).mask
    name = ref.name
    assert name is not None
    if ref.where is None:
        return lambda ctx: ctx.name_is(name)
    predicate = f.compile_predicate(ref.where, within=name)
    return lambda ctx: f.and_then(ctx, ctx.name_is(name), predicate)


def selector_keys(ref: p.SpanRef) -> set[KeyUse]:
    if ref.spanset is not None:
        return tqc.attribute_keys(ref.spanset)
    return f.key_uses(ref.where, ref.name) if ref.where is not None else set()


def compile_cond(cond: p.Cond) -> CondFn:
    match cond:
        case p.Exists(ref=ref):
            mask_fn = compile_selector(ref)
            # Plain span names recur across a tenant's rules: share their result per batch.
            key = ("exists", ref.name) if ref.spanset is None and ref.where is None else None

            def exists(ctx: BatchContext) -> CondResult:
                def compute() -> CondResult:
                    mask = mask_fn(ctx)
                    return CondResult(ctx.group_any(mask), mask)

                if key is None:
                    return compute()
                result = ctx.memo(key, compute)
                assert isinstance(result, CondResult)
                return result

            return exists
        case p.CountCompare(op=op, left=left, right=right):
            return _compile_count(op, left, right)
        case p.NotCond(operand=operand):
            inner = compile_cond(operand)

            def negate(ctx: BatchContext) -> CondResult:
                return CondResult(pc.invert(inner(ctx).value), ctx.all_false)

            return negate
        case p.BoolCond(op="and", left=left, right=right):
            lhs, rhs = compile_cond(left), compile_cond(right)

            def both(ctx: BatchContext) -> CondResult:
                a, b = lhs(ctx), rhs(ctx)
                value = pc.and_(a.value, b.value)
                evidence = pc.and_(pc.or_(a.evidence, b.evidence), ctx.spread(value))
                return CondResult(value, evidence)

            return both
        case p.BoolCond(left=left, right=right):
            lhs, rhs = compile_cond(left), compile_cond(right)

            def either(ctx: BatchContext) -> CondResult:
                a, b = lhs(ctx), rhs(ctx)
                evidence = pc.or_(
                    pc.and_(a.evidence, ctx.spread(a.value)),
                    pc.and_(b.evidence, ctx.spread(b.value)),
                )
                return CondResult(pc.or_(a.value, b.value), evidence)

            return either


def _compile_count(op: str, left: p.SpanRef, right: p.SpanRef | float) -> CondFn:
    lhs = compile_selector(left)
    rhs = None if isinstance(right, float) else compile_selector(right)
    compare = _CMP[op]

    def count(ctx: BatchContext) -> CondResult:
        a = lhs(ctx)
        evidence = a
        if rhs is None:
            assert isinstance(right, float)
            value = compare(ctx.group_count(a), right)
        else:
            b = rhs(ctx)
            value = compare(ctx.group_count(a), ctx.group_count(b))
            evidence = pc.or_(a, b)
        return CondResult(value, pc.and_(evidence, ctx.spread(value)))

    return count


def cond_keys(cond: p.Cond) -> set[KeyUse]:
    match cond:
        case p.Exists(ref=ref):
            return selector_keys(ref)
        case p.CountCompare(left=left, right=right):
            keys = selector_keys(left)
            return keys if isinstance(right, float) else keys | selector_keys(right)
        case p.NotCond(operand=operand):
            return cond_keys(operand)
        case p.BoolCond(left=left, right=right):
            return cond_keys(left) | cond_keys(right)


@dataclass(frozen=True, slots=True)
class RuleParts:
    """The evaluated clauses of one DSL rule on one batch."""

    when: CondResult
    always: CondResult | None
    never: CondResult | None
    violated: pa.Array  # per trace
    always_failed: pa.Array  # per trace
    never_matched: pa.Array  # per trace


class CompiledDsl:
    """The closures of one DSL rule; :meth:`run` evaluates a batch."""

    def __init__(self, rule: p.DslRule) -> None:
        self.ast = rule
        self._when = compile_cond(rule.when.cond)
        self._always = compile_cond(rule.always.cond) if rule.always else None
        self._never = compile_cond(rule.never.cond) if rule.never else None
        keys = cond_keys(rule.when.cond)
        for clause in (rule.always, rule.never):
            if clause is not None:
                keys |= cond_keys(clause.cond)
        self.keys = keys

    def run(self, ctx: BatchContext) -> RuleParts:
        when = self._when(ctx)
        always = self._always(ctx) if self._always else None
        never = self._never(ctx) if self._never else None
        false = pa.repeat(pa.scalar(False), ctx.ntraces)
        always_failed = pc.and_(when.value, pc.invert(always.value)) if always else false
        never_matched = pc.and_(when.value, never.value) if never else false
        violated = pc.or_(always_failed, never_matched)
        return RuleParts(when, always, never, violated, always_failed, never_matched)

    def message(self, parts: RuleParts) -> Callable[[int], str]:
        rule = self.ast
        failed = parts.always_failed.to_pylist()
        matched = parts.never_matched.to_pylist()

        def text(code: int) -> str:
            reasons = []
            if failed[code] and rule.always is not None:
                reasons.append(f"always {{ {rule.always.text} }} did not hold")
            if matched[code] and rule.never is not None:
                reasons.append(f"never {{ {rule.never.text} }} occurred")
            return f"when {{ {rule.when.text} }} matched but " + " and ".join(reasons)

        return text

    def evidence(self, ctx: BatchContext, parts: RuleParts) -> pa.Array:
        mask = parts.when.evidence
        if parts.never is not None:
            mask = pc.or_(mask, pc.and_(parts.never.evidence, ctx.spread(parts.never_matched)))
        return mask
