"""Compile rules into vectorised evaluators over columnar span batches.

:func:`compile_rule` parses a rule once (raising
:class:`~betrace.errors.RuleSyntaxError` with line, column and a caret) and
returns an object whose ``evaluate(traces)`` judges every trace of an Arrow
batch at once. Three languages are supported:

* ``betrace`` -- ``when { A } always { B } never { C }`` (:mod:`.dsl`)
* ``traceql`` -- Grafana Tempo's TraceQL; a match is a violation (:mod:`.traceql`)
* ``sequence`` -- ``A followed_by B within 30s`` (:mod:`.sequence`)

Evaluation never walks syntax trees per span: parsing produces closures over
``pyarrow.compute`` kernels, attribute JSON is read by DuckDB once per batch
for all rules of the tenant, and the per-batch derived columns (trace codes,
parent links, attributes) are shared by all rules evaluating the same table.
"""

from __future__ import annotations

import weakref

import pyarrow as pa
import pyarrow.compute as pc

from betrace.errors import RuleError
from betrace.rules.batch import BatchContext, KeyUse, context_for, register_keys
from betrace.rules.dsl import compiler as dslc
from betrace.rules.dsl import parser as dslp
from betrace.rules.model import Rule, Verdict, Violation
from betrace.rules.sequence import compiler as seq
from betrace.rules.traceql import ast as tq_ast
from betrace.rules.traceql import compiler as tqc
from betrace.rules.traceql import parser as tqp


class _Compiled:
    """Common plumbing: the rule, key registration and batch contexts."""

    def __init__(self, rule: Rule, keys: set[KeyUse]) -> None:
        self._rule = rule
        self._keys = keys
        weakref.finalize(self, register_keys(rule.tenant, keys))

    @property
    def rule(self) -> Rule:
        return self._rule

    def context(self, traces: pa.Table) -> BatchContext:
        ctx = context_for(traces)
        if self._keys:
            ctx.prefetch(self._rule.tenant, self._keys)
        return ctx

    def evaluate(self, traces: pa.Table, now_ns: int | None = None) -> list[Violation]:
        raise NotImplementedError

    def verdicts(self, traces: pa.Table, now_ns: int | None = None) -> dict[str, Verdict]:
        """The verdict of every trace in ``traces``."""
        if traces.num_rows == 0:
            return {}
        ctx = context_for(traces)
        result = dict.fromkeys(ctx.trace_ids.to_pylist(), Verdict.PASS)
        for trace_id in self._pending(traces, now_ns):
            result[trace_id] = Verdict.PENDING
        for violation in self.evaluate(traces, now_ns):
            result[violation.trace_id] = Verdict.VIOLATION
        return result

    def deadline_ns(self, traces: pa.Table) -> dict[str, int]:
        """Only ordering rules wait for a deadline; every other verdict is final at once."""
        del traces
        return {}

    def _pending(self, traces: pa.Table, now_ns: int | None) -> list[str]:
        del traces, now_ns
        return []


class CompiledDslRule(_Compiled):
    """A compiled ``betrace`` rule (``now_ns`` is accepted and ignored)."""

    def __init__(self, rule: Rule, program: dslc.CompiledDsl) -> None:
        super().__init__(rule, program.keys)
        self.program = program

    def evaluate(self, traces: pa.Table, now_ns: int | None = None) -> list[Violation]:
        del now_ns
        if traces.num_rows == 0:
            return []
        ctx = self.context(traces)
        parts = self.program.run(ctx)
        if not pc.any(parts.violated).as_py():
            return []
        evidence = self.program.evidence(ctx, parts)
        return ctx.violations(parts.violated, evidence, self.program.message(parts))


class CompiledTraceQLRule(_Compiled):
    """A compiled ``traceql`` rule: a trace violates when the query matches it."""

    def __init__(self, rule: Rule, query: tq_ast.Pipeline) -> None:
        super().__init__(rule, tqc.attribute_keys(query))
        self.query = query
        self.run = tqc.compile_pipeline(query)

    def evaluate(self, traces: pa.Table, now_ns: int | None = None) -> list[Violation]:
        del now_ns
        if traces.num_rows == 0:
            return []
        ctx = self.context(traces)
        spans = self.run(ctx).mask
        matched = ctx.group_any(spans)
        message = f"TraceQL query matched: {' '.join(self.rule.expression.split())}"
        return ctx.violations(matched, spans, message)


class CompiledSequenceRule(_Compiled):
    """A compiled ``sequence`` rule with deadline semantics (see :mod:`.sequence`)."""

    def __init__(self, rule: Rule, program: seq.CompiledSequence) -> None:
        super().__init__(rule, program.keys)
        self.program = program

    def _split(self, ctx: BatchContext, now_ns: int | None) -> tuple[pa.Array, pa.Array]:
        """Masks of (violating, pending) unmatched A spans."""
        parts = self.program.run(ctx)
        if now_ns is None:
            return parts.unmatched, ctx.all_false
        due = pc.less_equal(parts.deadline, now_ns)
        violating = pc.and_(parts.unmatched, due)
        return violating, pc.and_(parts.unmatched, pc.invert(due))

    def evaluate(self, traces: pa.Table, now_ns: int | None = None) -> list[Violation]:
        if traces.num_rows == 0:
            return []
        ctx = self.context(traces)
        violating, _ = self._split(ctx, now_ns)
        return ctx.violations(ctx.group_any(violating), violating, self.program.message())

    def deadline_ns(self, traces: pa.Table) -> dict[str, int]:
        """Per trace with an unmatched A span: when its violation becomes final."""
        if traces.num_rows == 0:
            return {}
        ctx = self.context(traces)
        parts = self.program.run(ctx)
        earliest = ctx.group_reduce(parts.deadline, parts.unmatched, "min")
        return {
            trace_id: deadline
            for trace_id, deadline in zip(ctx.trace_ids.to_pylist(), earliest.to_pylist(), strict=True)
            if deadline is not None
        }

    def _pending(self, traces: pa.Table, now_ns: int | None) -> list[str]:
        if now_ns is None:
            return []
        ctx = self.context(traces)
        _, pending = self._split(ctx, now_ns)
        flagged = pc.indices_nonzero(ctx.group_any(pending))
        pending_ids: list[str] = pc.take(ctx.trace_ids, flagged).to_pylist()
        return pending_ids


CompiledAny = CompiledDslRule | CompiledTraceQLRule | CompiledSequenceRule


def compile_rule(rule: Rule) -> CompiledAny:
    """Compile ``rule`` once; raise :class:`RuleSyntaxError` if it does not parse."""
    # Typed as str: rules come from YAML, so the Literal type is not a guarantee.
    language: str = rule.language
    if language == "betrace":
        return CompiledDslRule(rule, dslc.CompiledDsl(dslp.parse(rule.expression)))
    if language == "traceql":
        return CompiledTraceQLRule(rule, tqp.parse(rule.expression))
    if language == "sequence":
        return CompiledSequenceRule(rule, seq.CompiledSequence(seq.parse(rule.expression)))
    msg = f"rule {rule.id!r}: unknown language {rule.language!r}"
    raise RuleError(msg)
