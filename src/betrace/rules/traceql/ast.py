"""Syntax tree of TraceQL queries above the field level (see :mod:`betrace.rules.fields`)."""

from __future__ import annotations

from dataclasses import dataclass

from betrace.rules.fields import Expr


@dataclass(frozen=True, slots=True)
class Filter:
    """``{ expr }``: the spans for which ``expr`` holds."""

    expr: Expr


@dataclass(frozen=True, slots=True)
class SpansetOp:
    """``left OP right`` for ``&&``, ``||`` and the structural operators."""

    op: str
    left: SpansetExpr
    right: SpansetExpr


@dataclass(frozen=True, slots=True)
class Aggregate:
    """``count()``, ``avg(f)``, ``min(f)``, ``max(f)`` or ``sum(f)``."""

    func: str
    arg: Expr | None


@dataclass(frozen=True, slots=True)
class AggregateFilter:
    """``| agg OP value``: keeps the spanset (per group) when the comparison holds."""

    op: str
    left: Aggregate
    right: Aggregate | float


@dataclass(frozen=True, slots=True)
class By:
    """``| by(expr)``: later aggregates apply per trace and value of ``expr``."""

    expr: Expr


@dataclass(frozen=True, slots=True)
class NoOp:
    """``select(...)``, ``coalesce()``: shape results only; verdicts are unaffected."""

    name: str


@dataclass(frozen=True, slots=True)
class Pipeline:
    stages: tuple[Stage, ...]


SpansetExpr = Filter | SpansetOp | Pipeline
Stage = SpansetExpr | AggregateFilter | By | NoOp
