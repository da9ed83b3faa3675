"""Compile rules into vectorised evaluators over columnar span batches.

Walking-skeleton engine: supports ``when { X } always { Y }`` over span names.
The full engine (issue 3) replaces this module behind the same
:func:`compile_rule` entry point.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from betrace.errors import RuleSyntaxError
from betrace.rules.model import Rule, Violation

_NAME = r"[A-Za-z_][\w.\-/]*"
_WHEN_ALWAYS = re.compile(rf"^\s*when\s*\{{\s*({_NAME})\s*\}}\s*always\s*\{{\s*({_NAME})\s*\}}\s*$")


@dataclass(frozen=True, slots=True)
class _RequiresRule:
    rule: Rule
    trigger: str
    required: str

    def evaluate(self, traces: pa.Table) -> list[Violation]:
        names = traces.column("name")
        trace_ids = traces.column("trace_id")
        trigger_mask = pc.equal(names, self.trigger)
        if not pc.any(trigger_mask).as_py():
            return []
        satisfied = pc.unique(pc.filter(trace_ids, pc.equal(names, self.required)))
        hits = traces.filter(trigger_mask)
        hits = hits.filter(pc.invert(pc.is_in(hits.column("trace_id"), value_set=satisfied)))
        if hits.num_rows == 0:
            return []
        grouped = hits.group_by("trace_id").aggregate([("span_id", "list")])
        msg = f"'{self.trigger}' occurred without '{self.required}'"
        return [
            Violation(trace_id=t, span_ids=tuple(sorted(s)), message=msg)
            for t, s in zip(
                grouped.column("trace_id").to_pylist(),
                grouped.column("span_id_list").to_pylist(),
                strict=True,
            )
        ]


def compile_rule(rule: Rule) -> _RequiresRule:
    """Compile ``rule`` once; raise :class:`RuleSyntaxError` if it does not parse."""
    match = _WHEN_ALWAYS.match(rule.expression)
    if match is None:
        msg = f"rule {rule.id!r}: expected 'when {{ <span name> }} always {{ <span name> }}'"
        raise RuleSyntaxError(msg)
    return _RequiresRule(rule=rule, trigger=match.group(1), required=match.group(2))
