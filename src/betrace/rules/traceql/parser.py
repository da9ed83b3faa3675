"""Recursive-descent parser for TraceQL.

Grammar (precedence from loosest to tightest)::

    query     := pipeline ["with" "(" ... ")"]
    pipeline  := stage ("|" stage)*
    stage     := spanset | aggregate cmp (aggregate | number | duration)
               | "by" "(" field ")" | "select" "(" field ("," field)* ")" | "coalesce" "(" ")"
    spanset   := s_and ("||" s_and)*
    s_and     := s_rel ("&&" s_rel)*
    s_rel     := s_atom (REL s_atom)*         REL: > < >> << ~ and their ! and & forms
    s_atom    := "{" [cond] "}" | "(" pipeline ")"
    cond      := c_and ("||" c_and)*
    c_and     := c_not ("&&" c_not)*
    c_not     := "!" c_not | c_cmp
    c_cmp     := sum [CMP sum]                CMP: = != > >= < <= =~ !~
    sum       := product (("+" | "-") product)*
    product   := power (("*" | "/" | "%") power)*
    power     := unary ["^" power]
    unary     := "-" unary | "(" cond ")" | literal | field
"""

from __future__ import annotations

from betrace.rules import fields as f
from betrace.rules.lexer import Parser, Token
from betrace.rules.traceql import ast

RELATIONS: tuple[str, ...] = (">>", "<<", ">", "<", "~", "!>>", "!<<", "!>", "!<", "!~")
RELATIONS += ("&>>", "&<<", "&>", "&<", "&~")
COMPARISONS = ("=", "==", "!=", ">", ">=", "<", "<=", "=~", "!~")
AGGREGATES = ("count", "avg", "min", "max", "sum")
_METRICS = frozenset(
    {"rate", "count_over_time", "min_over_time", "max_over_time", "avg_over_time",
     "sum_over_time", "quantile_over_time", "histogram_over_time", "topk", "bottomk", "compare"}
)  # fmt: skip
STATUS_VALUES = ("error", "ok", "unset")
KIND_VALUES = ("unspecified", "internal", "server", "client", "producer", "consumer")
_BARE_INTRINSICS = {
    "name": ("intrinsic", "name"),
    "status": ("intrinsic", "status"),
    "kind": ("intrinsic", "kind"),
    "duration": ("intrinsic", "duration"),
    "childCount": ("intrinsic", "childCount"),
    "rootName": ("trace", "rootName"),
    "rootServiceName": ("trace", "rootService"),
    "traceDuration": ("trace", "duration"),
}
_SCOPED_INTRINSICS = {
    "span": {
        "name": "name", "status": "status", "kind": "kind", "duration": "duration",
        "id": "id", "parentID": "parentID", "childCount": "childCount",
    },
    "trace": {
        "duration": "duration", "rootName": "rootName", "rootService": "rootService",
        "rootServiceName": "rootService", "id": "id",
    },
}  # fmt: skip
_UNSUPPORTED_SCOPES = ("event", "link", "instrumentation", "parent")
_INT_BOUNDS = {"minInt": -(2**63), "maxInt": 2**63 - 1}


class TraceQLParser(Parser):
    """Parses TraceQL; also used by the DSL to read embedded spanset filters."""

    def parse_query(self) -> ast.Pipeline:
        pipeline = self.parse_pipeline()
        if self.accept("with"):
            # Query hints (most_recent=true, ...) only affect how Tempo searches.
            self.expect("(")
            while not self.at_op(")") and self.tok.kind != "eof":
                self.advance()
            self.expect(")")
        self.expect_end()
        return pipeline

    def parse_pipeline(self) -> ast.Pipeline:
        stages: list[ast.Stage] = [self.parse_stage()]
        while self.accept("|"):
            stages.append(self.parse_stage())
        return ast.Pipeline(tuple(stages))

    def parse_stage(self) -> ast.Stage:
        tok = self.tok
        if tok.kind == "ident" and self.peek().text == "(":
            if tok.text in AGGREGATES:
                return self._aggregate_filter()
            if tok.text == "by":
                self.advance()
                self.expect("(")
                expr = self.parse_value()
                self.expect(")")
                return ast.By(expr)
            if tok.text in ("select", "coalesce"):
                self.advance()
                self.expect("(")
                if not self.at_op(")"):
                    self.parse_value()
                    while self.accept(","):
                        self.parse_value()
                self.expect(")")
                return ast.NoOp(tok.text)
            if tok.text in _METRICS:
                self.fail(f"TraceQL metrics function {tok.text!r} is not supported in rules")
        return self.parse_spanset()

    def _aggregate(self) -> ast.Aggregate:
        func = self.advance().text
        self.expect("(")
        arg = None
        if func != "count":
            arg = self.parse_value()
        self.expect(")", f" to close {func}(")
        return ast.Aggregate(func, arg)

    def _aggregate_filter(self) -> ast.AggregateFilter:
        left = self._aggregate()
        op_tok = self.tok
        if not self.at_op(*COMPARISONS[:7]):
            self.error("expected a comparison such as '>' after the aggregate")
        self.advance()
        op = "=" if op_tok.text == "==" else op_tok.text
        right: ast.Aggregate | float
        if self.tok.kind == "ident" and self.tok.text in AGGREGATES:
            right = self._aggregate()
        else:
            lit = self._literal()
            if lit is None or lit.kind not in ("number", "duration"):
                self.error("expected a number or duration", op_tok if lit else None)
            assert isinstance(lit.value, int | float)
            right = float(lit.value)
        return ast.AggregateFilter(op, left, right)

    # -- spansets ----------------------------------------------------------------

    def parse_spanset(self) -> ast.SpansetExpr:
        with self.nested():
            left = self._spanset_and()
            while self.accept("||"):
                left = ast.SpansetOp("||", left, self._spanset_and())
            return left

    def _spanset_and(self) -> ast.SpansetExpr:
        left = self._spanset_rel()
        while self.accept("&&"):
            left = ast.SpansetOp("&&", left, self._spanset_rel())
        return left

    def _spanset_rel(self) -> ast.SpansetExpr:
        left = self._spanset_atom()
        while self.at_op(*RELATIONS):
            op = self.advance().text
            left = ast.SpansetOp(op, left, self._spanset_atom())
        return left

    def _spanset_atom(self) -> ast.SpansetExpr:
        with self.nested():
            if self.accept("{"):
                if self.accept("}"):
                    return ast.Filter(f.Const(value=True))
                expr = self.as_condition(self.parse_condition())
                self.expect("}", " to close the spanset filter")
                return ast.Filter(expr)
            if self.accept("("):
                pipeline = self.parse_pipeline()
                self.expect(")")
                if len(pipeline.stages) == 1 and not isinstance(
                    pipeline.stages[0], ast.AggregateFilter | ast.By | ast.NoOp
                ):
                    return pipeline.stages[0]
                return pipeline
            return self.error("expected '{' to start a spanset filter")

    # -- field expressions ----------------------------------------------------------

    def as_condition(self, expr: f.Expr, tok: Token | None = None) -> f.Expr:
        """Accept ``expr`` as a condition: bare attributes are compared to ``true``."""
        match expr:
            case f.Field(scope="span" | "resource" | "any"):
                return f.Truthy(expr)
            case f.Literal(kind="bool", value=bool() as value):
                return f.Const(value)
            case f.Compare() | f.Logical() | f.Not() | f.Truthy() | f.Const():
                return expr
        return self.error("expected a condition such as 'span.attr = value'", tok)

    def parse_condition(self) -> f.Expr:
        with self.nested():
            start = self.tok
            left = self._c_and()
            while self.accept("||"):
                right_tok = self.tok
                left = f.Logical(
                    "or", self.as_condition(left, start), self.as_condition(self._c_and(), right_tok)
                )
            return left

    def _c_and(self) -> f.Expr:
        start = self.tok
        left = self._c_not()
        while self.accept("&&"):
            right_tok = self.tok
            left = f.Logical(
                "and", self.as_condition(left, start), self.as_condition(self._c_not(), right_tok)
            )
        return left

    def _c_not(self) -> f.Expr:
        if self.accept("!"):
            with self.nested():
                tok = self.tok
                return f.Not(self.as_condition(self._c_not(), tok))
        return self._c_cmp()

    def _c_cmp(self) -> f.Expr:
        left_tok = self.tok
        left = self.parse_value()
        if not self.at_op(*COMPARISONS):
            return left
        self._operand(left, left_tok)
        op_tok = self.advance()
        op = "=" if op_tok.text == "==" else op_tok.text
        value_tok = self.tok
        right = self._operand(self.parse_value(), value_tok)
        if isinstance(left, f.Literal) and isinstance(right, f.Literal):
            self.fail("a comparison needs at least one field", op_tok)
        if isinstance(left, f.Literal):
            left, right = right, left
            op = {">": "<", ">=": "<=", "<": ">", "<=": ">="}.get(op, op)
        if not isinstance(right, f.Literal) and op in ("=~", "!~"):
            self.fail(f"{op!r} needs a string literal pattern", op_tok)
        problem = f.check_compare(op, left, right)
        if problem is not None:
            self.fail(problem, value_tok)
        return f.Compare(op, left, right)

    def parse_value(self) -> f.Expr:
        """An arithmetic expression over fields and literals."""
        left = self._product()
        while self.at_op("+", "-"):
            op = self.advance()
            left = self._arith(op, left, self._product())
        return left

    def _product(self) -> f.Expr:
        left = self._power()
        while self.at_op("*", "/", "%"):
            op = self.advance()
            left = self._arith(op, left, self._power())
        return left

    def _power(self) -> f.Expr:
        left = self._unary()
        if self.at_op("^"):
            op = self.advance()
            with self.nested():
                return self._arith(op, left, self._power())
        return left

    def _operand(self, expr: f.Expr, tok: Token) -> f.Expr:
        """Reject conditions where a value is needed, e.g. ``(a = 1) + 2``."""
        if not isinstance(expr, f.Field | f.Literal | f.Arith):
            self.fail("expected a value (field, number, string, ...), not a condition", tok)
        return expr

    def _arith(self, op: Token, left: f.Expr, right: f.Expr) -> f.Expr:
        self._operand(left, op)
        self._operand(right, op)
        for side in (left, right):
            if isinstance(side, f.Literal) and side.kind not in ("number", "duration"):
                self.fail(f"arithmetic {op.text!r} needs numbers", op)
        if isinstance(left, f.Literal) and isinstance(right, f.Literal):
            # Constant-fold so that `10 * 1024 * 1024` stays a literal.
            assert isinstance(left.value, int | float)
            assert isinstance(right.value, int | float)
            folded = f.scalar_arith(op.text, float(left.value), float(right.value))
            kind: f.LitKind = "duration" if "duration" in (left.kind, right.kind) else "number"
            return f.Literal(kind, int(folded) if folded.is_integer() else folded)
        return f.Arith(op.text, left, right)

    def _unary(self) -> f.Expr:
        with self.nested():
            if self.at_op("-"):
                minus = self.advance()
                operand = self._unary()
                if isinstance(operand, f.Literal) and isinstance(operand.value, int | float):
                    if isinstance(operand.value, bool):
                        self.fail("cannot negate a boolean", minus)
                    return f.Literal(operand.kind, -operand.value)
                return f.Arith("-", f.Literal("number", 0.0), operand)
            if self.accept("("):
                inner = self.parse_condition()
                self.expect(")")
                return inner
            lit = self._literal()
            if lit is not None:
                return lit
            return self.parse_field()

    def _literal(self) -> f.Literal | None:  # noqa: PLR0911 -- one return per literal form
        tok = self.tok
        if tok.kind == "string":
            self.advance()
            return f.Literal("string", str(tok.value))
        if tok.kind in ("number", "duration"):
            self.advance()
            assert isinstance(tok.value, int | float)
            return f.Literal("number" if tok.kind == "number" else "duration", tok.value)
        if tok.kind != "ident":
            return None
        word = tok.text
        if word in ("true", "false"):
            self.advance()
            return f.Literal("bool", word == "true")
        if word == "nil":
            self.advance()
            return f.Literal("nil", None)
        if word in _INT_BOUNDS:
            self.advance()
            return f.Literal("number", _INT_BOUNDS[word])
        if (word in STATUS_VALUES or word in KIND_VALUES) and self.peek().text not in (".", ":"):
            self.advance()
            return f.Literal("enum", word)
        return None

    def parse_field(self) -> f.Field:
        tok = self.tok
        nxt = self.peek()
        if tok.kind == "op" and tok.text == ".":
            self.advance()
            if not self.adjacent():
                self.error("expected an attribute name right after '.'")
            name, _ = self.dotted_name("an attribute name")
            return f.Field("any", name)
        if tok.kind != "ident":
            self.error("expected a field such as span.http.method, name or duration")
        scope = tok.text
        if nxt.text in (".", ":") and nxt.pos == tok.end:
            if scope in _UNSUPPORTED_SCOPES:
                self.fail(f"the {scope!r} scope is not available in BeTrace span batches")
            self.advance()
            sep = self.advance().text
            if sep == "." and scope in ("span", "resource"):
                if not self.adjacent():
                    self.error("expected an attribute name right after '.'")
                name, _ = self.dotted_name("an attribute name")
                return f.Field("span" if scope == "span" else "resource", name)
            if sep == ":" and scope in _SCOPED_INTRINSICS:
                name_tok = self.tok
                intrinsic = _SCOPED_INTRINSICS[scope].get(name_tok.text)
                if name_tok.kind != "ident" or intrinsic is None or not self.adjacent():
                    known = ", ".join(f"{scope}:{k}" for k in _SCOPED_INTRINSICS[scope])
                    self.error(f"expected one of {known}")
                self.advance()
                return f.Field("trace" if scope == "trace" else "intrinsic", intrinsic)
            self.fail(f"unknown scope {scope!r}; use span., resource., span: or trace:", tok)
        if scope in _BARE_INTRINSICS:
            self.advance()
            kind, name = _BARE_INTRINSICS[scope]
            return f.Field("intrinsic" if kind == "intrinsic" else "trace", name)
        if scope == "statusMessage":
            self.fail("statusMessage is not available in BeTrace span batches")
        return self.fail(
            f"unknown identifier {scope!r}; attributes need a scope such as span.{scope}, "
            f"resource.{scope} or .{scope}"
        )


def parse(source: str) -> ast.Pipeline:
    """Parse a TraceQL query; raise :class:`RuleSyntaxError` on bad input."""
    return TraceQLParser(source).parse_query()
