"""The rule model shared by the loader, the engine and the evaluate stage."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal, Protocol

import pyarrow as pa

Severity = Literal["info", "low", "medium", "high", "critical"]
Language = Literal["betrace", "traceql", "sequence"]
SEVERITIES: tuple[Severity, ...] = ("info", "low", "medium", "high", "critical")
LANGUAGES: tuple[Language, ...] = ("betrace", "traceql", "sequence")


@dataclass(frozen=True, slots=True)
class Rule:
    """One immutable version of a tenant's rule."""

    id: str
    tenant: str
    name: str
    expression: str
    severity: Severity = "medium"
    language: Language = "betrace"
    version: int = 1
    enabled: bool = True
    description: str = ""


class Verdict(enum.Enum):
    """Outcome of one rule on one trace."""

    PASS = "pass"  # noqa: S105 - a verdict, not a password
    VIOLATION = "violation"
    # Ordering rules whose deadline has not passed yet.
    PENDING = "pending"


@dataclass(frozen=True, slots=True)
class Violation:
    """A rule matched a trace: the raw material of a signal."""

    trace_id: str
    span_ids: tuple[str, ...]
    message: str


class CompiledRule(Protocol):
    """A rule compiled once, evaluated over many traces at a time.

    ``traces`` follows ``betrace.streams.schemas.SPAN_SCHEMA`` and holds every
    span of each trace it mentions, all of one tenant.
    """

    @property
    def rule(self) -> Rule: ...

    def evaluate(self, traces: pa.Table, now_ns: int | None = None) -> list[Violation]:
        """The violations among ``traces``.

        With ``now_ns``, an ordering rule whose deadline lies after ``now_ns``
        is still PENDING and not reported; without it every verdict is final.
        """
        ...

    def verdicts(self, traces: pa.Table, now_ns: int | None = None) -> dict[str, Verdict]:
        """The verdict of every trace in ``traces``."""
        ...

    def deadline_ns(self, traces: pa.Table) -> dict[str, int]:
        """Per trace that is not final yet: when its verdict becomes final."""
        ...
