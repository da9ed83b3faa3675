"""Recursive-descent parser for the BeTrace DSL v2.

Grammar::

    rule      := "when" "{" cond "}" clause+          (each clause at most once)
    clause    := "always" "{" cond "}" | "never" "{" cond "}"
    cond      := c_and ("or" c_and)*
    c_and     := c_not ("and" c_not)*
    c_not     := "not" c_not | "(" cond ")" | count | traceql | span
    span      := NAME (".where(" where ")")*      NAME: dotted identifier or quoted string
    count     := "count(" selector ")" CMP (NUMBER | "count(" selector ")")
    selector  := span | traceql
    traceql   := TraceQL spanset expression, e.g. {span.http.status_code >= 500}
    where     := w_and ("or" w_and)*
    w_and     := w_not ("and" w_not)*
    w_not     := "not" w_not | "(" where ")" | FIELD [OP value]   (bare FIELD: FIELD == true)
    OP        := == != > >= < <= in | not in | matches | contains
    value     := STRING | NUMBER | DURATION | true | false | null | IDENT | "[" value ("," value)* "]"

A bare identifier value is a string (``currency == USD``), as in BeTrace's docs.
"""

from __future__ import annotations

from dataclasses import dataclass

from betrace.rules import fields as f
from betrace.rules.lexer import Parser, Token
from betrace.rules.traceql import ast as tq
from betrace.rules.traceql.parser import TraceQLParser

KEYWORDS = frozenset({"when", "always", "never", "and", "or", "not", "count"})
_OPS = {"==": "=", "=": "=", "!=": "!=", ">": ">", ">=": ">=", "<": "<", "<=": "<="}
_OPS |= {"in": "in", "matches": "=~", "contains": "contains"}


@dataclass(frozen=True, slots=True)
class SpanRef:
    """Spans named ``name`` (any name when None) satisfying ``where``."""

    name: str | None
    where: f.Expr | None = None
    spanset: tq.SpansetExpr | None = None


@dataclass(frozen=True, slots=True)
class Exists:
    ref: SpanRef


@dataclass(frozen=True, slots=True)
class CountCompare:
    op: str
    left: SpanRef
    right: SpanRef | float


@dataclass(frozen=True, slots=True)
class BoolCond:
    op: str  # "and" | "or"
    left: Cond
    right: Cond


@dataclass(frozen=True, slots=True)
class NotCond:
    operand: Cond


Cond = Exists | CountCompare | BoolCond | NotCond


@dataclass(frozen=True, slots=True)
class Clause:
    cond: Cond
    text: str


@dataclass(frozen=True, slots=True)
class DslRule:
    when: Clause
    always: Clause | None
    never: Clause | None


class DslParser(Parser):
    def parse_rule(self) -> DslRule:
        if not self.at_word("when"):
            self.error("expected 'when' (rules read: when { ... } always { ... })")
        self.advance()
        when = self._clause("when")
        clauses: dict[str, Clause] = {}
        while self.at_word("always", "never"):
            word = self.tok
            if word.text in clauses:
                self.fail(f"duplicate '{word.text}' clause", word)
            self.advance()
            clauses[word.text] = self._clause(word.text)
        if not clauses:
            self.error("expected 'always' or 'never'")
        self.expect_end()
        return DslRule(when, clauses.get("always"), clauses.get("never"))

    def _clause(self, word: str) -> Clause:
        self.expect("{", f" after '{word}'")
        start = self.tok
        if self.at_op("}"):
            self.error(f"expected a condition inside '{word} {{ }}'")
        cond = self.parse_cond()
        end = self.tok
        self.expect("}", f" to close '{word} {{'")
        return Clause(cond, " ".join(self.source[start.pos : end.pos].split()))

    def parse_cond(self) -> Cond:
        with self.nested():
            left = self._and()
            while self.accept("or"):
                left = BoolCond("or", left, self._and())
            return left

    def _and(self) -> Cond:
        left = self._not()
        while self.accept("and"):
            left = BoolCond("and", left, self._not())
        return left

    def _not(self) -> Cond:
        with self.nested():
            if self.accept("not"):
                return NotCond(self._not())
            if self.accept("("):
                inner = self.parse_cond()
                self.expect(")")
                return inner
            if self.at_word("count") and self.peek().text == "(":
                return self._count()
            return Exists(self.parse_selector())

    def _count(self) -> CountCompare:
        left = self._count_term()
        op_tok = self.tok
        if not self.at_op("==", "=", "!=", ">", ">=", "<", "<="):
            self.error("expected a comparison such as '>' or '!=' after count(...)")
        self.advance()
        right: SpanRef | float
        if self.at_word("count") and self.peek().text == "(":
            right = self._count_term()
        elif self.tok.kind == "number":
            value = self.advance().value
            assert isinstance(value, int | float)
            right = float(value)
        else:
            self.error("expected a number or count(...)")
        return CountCompare(_OPS[op_tok.text], left, right)

    def _count_term(self) -> SpanRef:
        self.advance()
        self.expect("(")
        ref = self.parse_selector()
        self.expect(")", " to close count(")
        return ref

    def parse_selector(self) -> SpanRef:
        """A span reference with optional ``.where(...)`` chain, or a TraceQL filter."""
        if self.at_op("{"):
            sub = TraceQLParser(self.source, self.tokens, self.index)
            sub.depth = self.depth
            spanset = sub.parse_spanset()
            self.index = sub.index
            return SpanRef(None, spanset=spanset)
        tok = self.tok
        if tok.kind == "ident" and tok.text in KEYWORDS:
            self.error("expected a span name")
        name, _ = self.dotted_name("a span name, count(...) or a {TraceQL} filter")
        where: f.Expr | None = None
        while self.at_op(".") and self.peek().text == "where":
            self.advance()
            self.advance()
            self.expect("(", " after '.where'")
            if self.at_op(")"):
                self.error("expected a condition inside .where()")
            cond = self.parse_where()
            self.expect(")", " to close .where(")
            where = cond if where is None else f.Logical("and", where, cond)
        return SpanRef(name, where)

    # -- .where(...) ----------------------------------------------------------------

    def parse_where(self) -> f.Expr:
        with self.nested():
            left = self._w_and()
            while self.accept("or"):
                left = f.Logical("or", left, self._w_and())
            return left

    def _w_and(self) -> f.Expr:
        left = self._w_not()
        while self.accept("and"):
            left = f.Logical("and", left, self._w_not())
        return left

    def _w_not(self) -> f.Expr:
        with self.nested():
            if self.at_word("not"):
                self.advance()
                return f.Not(self._w_not())
            if self.accept("("):
                inner = self.parse_where()
                self.expect(")")
                return inner
            return self._w_compare()

    def _w_compare(self) -> f.Expr:
        tok = self.tok
        if tok.kind == "ident" and tok.text in KEYWORDS:
            self.error("expected an attribute name")
        name, _ = self.dotted_name("an attribute name")
        field = f.Field("dsl", name)
        negate = False
        if self.at_word("not") and self.peek().text == "in":
            self.advance()
            negate = True
        if not self.at(*_OPS):
            if negate:
                self.error("expected 'in' after 'not'")
            return f.Truthy(field)
        op = _OPS[self.advance().text]
        value_tok = self.tok
        value = self._value()
        if negate:
            op = "not in"
        problem = f.check_compare(op, field, value)
        if problem is not None:
            self.fail(problem, value_tok)
        return f.Compare(op, field, value)

    def _value(self) -> f.Literal:
        tok = self.tok
        if self.accept("["):
            items: list[f.Scalar] = []
            while True:
                item = self._value()
                if item.kind == "list":
                    self.fail("lists cannot be nested", tok)
                assert not isinstance(item.value, tuple)
                items.append(item.value)
                if not self.accept(","):
                    break
            self.expect("]", " to close the list")
            return f.Literal("list", tuple(items))
        if self.at_op("-") and self.peek().kind in ("number", "duration"):
            self.advance()
            lit = self._value()
            assert isinstance(lit.value, int | float)
            return f.Literal(lit.kind, -lit.value)
        if tok.kind == "string":
            self.advance()
            return f.Literal("string", str(tok.value))
        if tok.kind in ("number", "duration"):
            self.advance()
            assert isinstance(tok.value, int | float)
            return f.Literal("number" if tok.kind == "number" else "duration", tok.value)
        if tok.kind == "ident":
            return self._word_value(tok)
        return self.error("expected a value (string, number, true/false, identifier or list)")

    def _word_value(self, tok: Token) -> f.Literal:
        if tok.text in ("true", "false"):
            self.advance()
            return f.Literal("bool", tok.text == "true")
        if tok.text in ("null", "nil"):
            self.advance()
            return f.Literal("nil", None)
        name, _ = self.dotted_name("a value")
        return f.Literal("string", name)


def parse(source: str) -> DslRule:
    """Parse a BeTrace DSL rule; raise :class:`RuleSyntaxError` on bad input."""
    return DslParser(source).parse_rule()
