"""Human-readable verdicts for ``betrace rules test`` and expression validation."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from betrace.errors import RuleError
from betrace.rules.batch import BatchContext
from betrace.rules.dsl import parser as dslp
from betrace.rules.engine import (
    CompiledDslRule,
    CompiledSequenceRule,
    CompiledTraceQLRule,
    compile_rule,
)
from betrace.rules.model import LANGUAGES, Rule
from betrace.rules.sequence import compiler as seq
from betrace.rules.traceql import parser as tqp

_MAX_LISTED = 20


def validate(expression: str, language: str) -> None:
    """Raise :class:`RuleSyntaxError` if ``expression`` is not a valid rule."""
    if language == "betrace":
        dslp.parse(expression)
    elif language == "traceql":
        tqp.parse(expression)
    elif language == "sequence":
        seq.parse(expression)
    else:
        msg = f"unknown rule language {language!r}; expected one of {', '.join(LANGUAGES)}"
        raise RuleError(msg)


def _spans_by_trace(ctx: BatchContext, mask: pa.Array) -> dict[int, list[str]]:
    """Span descriptions ``name#id`` per trace code for the spans in ``mask``."""
    codes = pc.filter(ctx.codes, mask).to_pylist()
    names = pc.filter(ctx.column("name"), mask).to_pylist()
    ids = pc.filter(ctx.column("span_id"), mask).to_pylist()
    out: dict[int, list[str]] = {}
    for code, name, span_id in zip(codes, names, ids, strict=True):
        out.setdefault(code, []).append(f"{name}#{span_id}")
    return out


def _listing(spans: list[str]) -> str:
    if not spans:
        return "no spans"
    shown = ", ".join(sorted(spans)[:_MAX_LISTED])
    more = len(spans) - _MAX_LISTED
    return shown + (f" (+{more} more)" if more > 0 else "")


def explain(rule: Rule, traces: pa.Table, now_ns: int | None = None) -> str:
    """Describe, trace by trace, why ``rule`` passes or fails on ``traces``."""
    compiled = compile_rule(rule)
    lines = [f"rule {rule.id} ({rule.language}): {' '.join(rule.expression.split())}"]
    if traces.num_rows == 0:
        return "\n".join([*lines, "no spans given"])
    verdicts = compiled.verdicts(traces, now_ns)
    ctx = compiled.context(traces)
    trace_ids = ctx.trace_ids.to_pylist()
    details: dict[int, list[str]] = {code: [] for code in range(len(trace_ids))}
    if isinstance(compiled, CompiledDslRule):
        _explain_dsl(compiled, ctx, details)
    elif isinstance(compiled, CompiledTraceQLRule):
        matched = _spans_by_trace(ctx, compiled.run(ctx).mask)
        for code, extra in details.items():
            extra.append(f"  matched: {_listing(matched.get(code, []))}")
    elif isinstance(compiled, CompiledSequenceRule):
        _explain_sequence(compiled, ctx, details, now_ns)
    for code, trace_id in enumerate(trace_ids):
        lines.append(f"trace {trace_id}: {verdicts[trace_id].value.upper()}")
        lines.extend(details[code])
    return "\n".join(lines)


def _explain_dsl(compiled: CompiledDslRule, ctx: BatchContext, out: dict[int, list[str]]) -> None:
    program = compiled.program
    parts = program.run(ctx)
    clauses = [("when", program.ast.when, parts.when)]
    if program.ast.always is not None and parts.always is not None:
        clauses.append(("always", program.ast.always, parts.always))
    if program.ast.never is not None and parts.never is not None:
        clauses.append(("never", program.ast.never, parts.never))
    for word, clause, result in clauses:
        holds = result.value.to_pylist()
        spans = _spans_by_trace(ctx, result.evidence)
        for code, extra in out.items():
            state = "holds" if holds[code] else "does not hold"
            evidence = f" [{_listing(spans[code])}]" if code in spans else ""
            extra.append(f"  {word} {{ {clause.text} }}: {state}{evidence}")


def _explain_sequence(
    compiled: CompiledSequenceRule,
    ctx: BatchContext,
    out: dict[int, list[str]],
    now_ns: int | None,
) -> None:
    parts = compiled.program.run(ctx)
    firsts = _spans_by_trace(ctx, parts.first)
    unmatched = _spans_by_trace(ctx, parts.unmatched)
    deadlines = compiled.deadline_ns(ctx.table)
    trace_ids = ctx.trace_ids.to_pylist()
    for code, extra in out.items():
        extra.append(f"  {compiled.program.ast.first_text}: {_listing(firsts.get(code, []))}")
        missing = unmatched.get(code, [])
        extra.append(f"  not followed in time: {_listing(missing)}")
        deadline = deadlines.get(trace_ids[code])
        if deadline is not None:
            when = "" if now_ns is None else f" (now {now_ns})"
            extra.append(f"  final at {deadline} ns{when}")
