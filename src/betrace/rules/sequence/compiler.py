"""Parse and compile sequence rules (see :mod:`betrace.rules.sequence`)."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from betrace.rules.batch import BatchContext, KeyUse
from betrace.rules.dsl import compiler as dslc
from betrace.rules.dsl.parser import DslParser, SpanRef


@dataclass(frozen=True, slots=True)
class SequenceRule:
    first: SpanRef
    then: SpanRef
    within_ns: int
    anchor: str  # "end" | "start"
    first_text: str
    then_text: str


class SequenceParser(DslParser):
    def parse_sequence(self) -> SequenceRule:
        start = self.tok
        first = self.parse_selector()
        first_text = self.source[start.pos : self.tokens[self.index - 1].end]
        if self.at_word("followed") and self.peek().text == "by":
            self.advance()
            self.advance()
        elif not self.accept("followed_by"):
            self.error("expected 'followed_by'")
        start = self.tok
        then = self.parse_selector()
        then_text = self.source[start.pos : self.tokens[self.index - 1].end]
        if not self.at_word("within"):
            self.error("expected 'within' and a duration such as 30s")
        self.advance()
        tok = self.tok
        if tok.kind != "duration":
            self.error("expected a duration such as 30s, 500ms or 1h")
        self.advance()
        assert isinstance(tok.value, int)
        anchor = "end"
        if self.accept("from"):
            if not self.at_word("start", "end"):
                self.error("expected 'start' or 'end' after 'from'")
            anchor = self.advance().text
        self.expect_end()
        return SequenceRule(first, then, tok.value, anchor, first_text, then_text)


def parse(source: str) -> SequenceRule:
    return SequenceParser(source).parse_sequence()


@dataclass(frozen=True, slots=True)
class SequenceParts:
    """Per A span of the batch: whether it was followed in time, and its deadline."""

    first: pa.Array  # mask of A spans
    unmatched: pa.Array  # mask: A spans with no B in the window
    deadline: pa.Array  # int64 per span (anchor + T), meaningful where ``first``
    then: pa.Array  # mask of B spans (windowed summaries carry their start times on)


class CompiledSequence:
    def __init__(self, rule: SequenceRule) -> None:
        self.ast = rule
        self._first = dslc.compile_selector(rule.first)
        self._then = dslc.compile_selector(rule.then)
        self.keys: set[KeyUse] = dslc.selector_keys(rule.first) | dslc.selector_keys(rule.then)

    def run(self, ctx: BatchContext) -> SequenceParts:
        a = self._first(ctx)
        b = self._then(ctx)
        anchor_col = ctx.column("end_ns" if self.ast.anchor == "end" else "start_ns")
        deadline = pc.add(anchor_col, self.ast.within_ns)
        a_rows = pc.indices_nonzero(a)
        if len(a_rows) == 0:
            return SequenceParts(a, ctx.all_false, deadline, b)
        b_rows = pc.indices_nonzero(b)
        matched_rows = _followed(ctx, a_rows, b_rows, anchor_col, self.ast.within_ns)
        matched = ctx.rows_mask(matched_rows)
        return SequenceParts(a, pc.and_(a, pc.invert(matched)), deadline, b)

    def message(self) -> str:
        seconds = self.ast.within_ns / 1e9
        return (
            f"{self.ast.first_text} was not followed by {self.ast.then_text} "
            f"within {seconds:g}s of its {self.ast.anchor}"
        )


def _followed(
    ctx: BatchContext, a_rows: pa.Array, b_rows: pa.Array, anchor: pa.Array, within: int
) -> pa.Array:
    """Rows of ``a_rows`` with a different B row starting in [anchor, anchor + within].

    Sorts A anchors and B starts together per trace (A before B on ties, so a
    B at exactly the anchor counts) and back-fills "position of the next B",
    which finds each A's earliest eligible B without a quadratic join.
    """
    count_a, count_b = len(a_rows), len(b_rows)
    if count_b == 0:
        return pa.array([], pa.uint64())
    rows = pa.concat_arrays([a_rows, b_rows])
    events = pa.table(
        {
            "code": pc.take(ctx.codes, rows),
            "t": pa.concat_arrays([pc.take(anchor, a_rows), pc.take(ctx.column("start_ns"), b_rows)]),
            "is_b": pa.concat_arrays(
                [pa.repeat(pa.scalar(False), count_a), pa.repeat(pa.scalar(True), count_b)]
            ),
            "row": rows,
        }
    )
    order = pc.sort_indices(events, [("code", "ascending"), ("t", "ascending"), ("is_b", "ascending")])
    events = events.take(order)
    size = events.num_rows
    position = ctx.arange(size) if size <= ctx.n else pa.array(range(size), pa.int32())
    is_b = events.column("is_b").combine_chunks()
    next_b = pc.fill_null_backward(pc.if_else(is_b, position, pa.scalar(None, pa.int32())))
    code = events.column("code").combine_chunks()
    t = events.column("t").combine_chunks()
    row = events.column("row").combine_chunks()
    is_a = pc.invert(is_b)

    def ok(candidate: pa.Array) -> pa.Array:
        same_trace = pc.equal(pc.take(code, candidate), code)
        other_span = pc.not_equal(pc.take(row, candidate), row)
        in_time = pc.less_equal(pc.take(t, candidate), pc.add(t, within))
        return pc.and_(pc.and_(same_trace, other_span), in_time).fill_null(False)

    first = ok(next_b)
    # When the next B is this very span (it matches A and B), try the one after it.
    after = pc.add(next_b, 1)
    after = pc.if_else(pc.less(after, size), after, pa.scalar(None, pa.int32()))
    second_candidate = pc.take(next_b, after)
    second = ok(second_candidate)
    hit = pc.and_(is_a, pc.or_(first, second))
    return pc.filter(row, hit)
