"""Per-span field expressions shared by the DSL ``.where(...)`` and TraceQL ``{...}``.

Both parsers build the same small AST (:data:`Expr`); :func:`compile_predicate`
turns it, once, into a closure from a :class:`BatchContext` to a boolean mask
over every span of the batch, built only from ``pyarrow.compute`` kernels.

Semantics worth knowing:

* A comparison on a missing attribute is false, for ``!=`` too; ``= nil`` and
  ``!= nil`` test presence.
* No implicit coercion: a number literal only compares with JSON numbers (and
  numeric intrinsics), a string literal with strings, ``true``/``false`` with
  booleans. Strings order lexicographically.
* Regular expressions are RE2 (linear time) and fully anchored.
* Array attributes: ``=``, ``=~``, ordering, ``in`` and ``contains`` match if
  any element does; ``!=`` and ``!~`` match if no element does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal as TypingLiteral

import pyarrow as pa
import pyarrow.compute as pc
import re2

from betrace.rules import typed as tv
from betrace.rules.batch import KIND_NAMES, STATUS_NAMES, BatchContext, KeyUse, Scope
from betrace.rules.diagnostics import MAX_REGEX_PROGRAM_SIZE
from betrace.rules.typed import Typed

FieldScope = TypingLiteral["span", "resource", "any", "intrinsic", "trace", "dsl"]
LitKind = TypingLiteral["string", "number", "duration", "bool", "nil", "enum", "list"]
Scalar = str | int | float | bool | None
MaskFn = Callable[[BatchContext], pa.Array]
ValueFn = Callable[[BatchContext], Typed]

#: Intrinsics by the name used after ``span:`` (TraceQL) or bare.
SPAN_INTRINSICS = frozenset(
    {"name", "status", "kind", "duration", "id", "parentID", "childCount", "service",
     "duration_ms"}
)  # fmt: skip
TRACE_INTRINSICS = frozenset({"duration", "rootName", "rootService", "rootServiceName", "id"})
#: Bare names the DSL resolves to an intrinsic when the span has no such attribute.
DSL_INTRINSICS = frozenset({"name", "duration", "duration_ms", "status", "kind", "service"})
EQUALITY_OPS = frozenset({"=", "!="})
ORDER_OPS = frozenset({">", ">=", "<", "<="})
_PC_OPS: dict[str, Callable[..., pa.Array]] = {
    "=": pc.equal, "!=": pc.not_equal, ">": pc.greater, ">=": pc.greater_equal,
    "<": pc.less, "<=": pc.less_equal,
}  # fmt: skip
_NEGATIVE = {"!=": "=", "!~": "=~", "not in": "in"}
#: Enum intrinsics: their int8 column and the names of its codes.
_ENUMS = {"status": ("status_code", STATUS_NAMES), "kind": ("kind", KIND_NAMES)}


@dataclass(frozen=True, slots=True)
class Literal:
    kind: LitKind
    value: Scalar | tuple[Scalar, ...]


@dataclass(frozen=True, slots=True)
class Field:
    scope: FieldScope
    name: str


@dataclass(frozen=True, slots=True)
class Compare:
    op: str
    left: Expr
    right: Expr


@dataclass(frozen=True, slots=True)
class Logical:
    op: TypingLiteral["and", "or"]
    left: Expr
    right: Expr


@dataclass(frozen=True, slots=True)
class Not:
    operand: Expr


@dataclass(frozen=True, slots=True)
class Arith:
    op: str
    left: Expr
    right: Expr


@dataclass(frozen=True, slots=True)
class Truthy:
    """A boolean attribute used as a condition: true where it is ``true``."""

    field: Field


@dataclass(frozen=True, slots=True)
class Const:
    value: bool


Expr = Literal | Field | Compare | Logical | Not | Arith | Truthy | Const


def compile_regex(pattern: str) -> str:
    """Validate ``pattern`` with RE2 and return its fully anchored form.

    Raises :class:`ValueError` with RE2's reason; callers turn it into a
    positioned syntax error.
    """
    options = re2.Options()
    options.log_errors = False
    try:
        compiled = re2.compile(pattern, options=options)
    except re2.error as exc:
        reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        msg = f"invalid regular expression {pattern!r}: {reason} (RE2 syntax, no backreferences)"
        raise ValueError(msg) from None
    if compiled.programsize > MAX_REGEX_PROGRAM_SIZE:
        msg = (
            f"regular expression {pattern!r} is too complex (RE2 program size "
            f"{compiled.programsize} > {MAX_REGEX_PROGRAM_SIZE})"
        )
        raise ValueError(msg)
    return f"^(?:{pattern})$"


def check_compare(op: str, left: Expr, right: Expr) -> str | None:  # noqa: PLR0911
    """Return why ``left op right`` is ill-typed, or None when it is fine."""
    lit = right if isinstance(right, Literal) else None
    if lit is None:
        return None
    if op in ("=~", "!~", "matches"):
        if lit.kind != "string":
            return f"operator {op!r} needs a string pattern"
        try:
            compile_regex(str(lit.value))
        except ValueError as exc:
            return str(exc)
    elif lit.kind == "bool" and op not in EQUALITY_OPS:
        return f"booleans only support '=' and '!=', not {op!r}"
    elif lit.kind == "nil" and op not in EQUALITY_OPS:
        return f"nil only supports '=' and '!=', not {op!r}"
    elif op in ("in", "not in") and lit.kind != "list":
        return f"operator {op!r} needs a list such as [a, b]"
    elif lit.kind == "list" and op not in ("in", "not in"):
        return f"a list can only be used with 'in', not {op!r}"
    return None


def attribute_keys(expr: Expr) -> set[tuple[Scope, str]]:  # noqa: PLR0911 -- dispatch
    """The attribute keys ``expr`` reads, for one-pass extraction (see :func:`key_uses`)."""
    match expr:
        case Field(scope="span" | "dsl", name=name):
            return {("span", name)}
        case Field(scope="resource", name=name) if name != "service.name":
            return {("resource", name)}
        case Field(scope="any", name=name):
            keys: set[tuple[Scope, str]] = {("span", name)}
            return keys if name == "service.name" else keys | {("resource", name)}
        case Compare(left=a, right=b) | Logical(left=a, right=b) | Arith(left=a, right=b):
            return attribute_keys(a) | attribute_keys(b)
        case Not(operand=a):
            return attribute_keys(a)
        case Truthy(field=f):
            return attribute_keys(f)
        case _:
            return set()


def key_uses(expr: Expr, within: str | None = None) -> set[KeyUse]:
    """:func:`attribute_keys` with the span name each span attribute is read under."""
    return {(scope, key, within if scope == "span" else None) for scope, key in attribute_keys(expr)}


# -- values -----------------------------------------------------------------------


def _intrinsic(ctx: BatchContext, name: str) -> Typed:
    def compute() -> Typed:  # noqa: PLR0911 -- one return per intrinsic
        match name:
            case "name":
                return Typed(text=ctx.column("name"))
            case "service":
                service = ctx.column("service")
                return Typed(text=service, present=pc.is_valid(service))
            case "duration":
                return Typed(num=ctx.duration())
            case "duration_ms":
                return Typed(num=pc.divide(pc.cast(ctx.duration(), pa.float64()), 1e6))
            case "status":
                return Typed(text=_enum_names(ctx.column("status_code"), STATUS_NAMES))
            case "kind":
                return Typed(text=_enum_names(ctx.column("kind"), KIND_NAMES))
            case "id":
                return Typed(text=ctx.column("span_id"))
            case "parentID":
                parent = ctx.column("parent_span_id")
                return Typed(text=parent, present=pc.is_valid(parent))
            case "childCount":
                return Typed(num=ctx.child_count())
        msg = f"unknown intrinsic {name!r}"
        raise AssertionError(msg)

    result = ctx.memo(("intrinsic", name), compute)
    assert isinstance(result, Typed)
    return result


def _enum_names(codes: pa.Array, names: tuple[str, ...]) -> pa.Array:
    bounds = pc.min_max(codes).as_py()
    if bounds["min"] is None or (bounds["min"] >= 0 and bounds["max"] < len(names)):
        return pc.take(pa.array(names), codes)  # the usual case: every code is known
    index = pc.cast(codes, pa.int32())
    valid = pc.and_(pc.greater_equal(index, 0), pc.less(index, len(names)))
    return pc.take(pa.array(names), pc.if_else(valid, index, 0))


def _trace_intrinsic(ctx: BatchContext, name: str) -> Typed:
    if name == "id":
        return Typed(text=ctx.column("trace_id"))
    if name == "duration":
        return Typed(num=ctx.trace_value("duration"))
    values = ctx.trace_value("rootName" if name == "rootName" else "rootService")
    return Typed(text=values, present=pc.is_valid(values))


def _resource(ctx: BatchContext, name: str) -> Typed:
    if name == "service.name":
        return _intrinsic(ctx, "service")
    return ctx.attribute("resource", name)


def compile_field(field: Field, within: str | None = None) -> ValueFn:  # noqa: PLR0911 -- dispatch
    """``within``: the span name every use of the value is restricted to (see BatchContext.attribute)."""
    name = field.name
    match field.scope:
        case "span":
            return lambda ctx: ctx.attribute("span", name, within)
        case "resource":
            return lambda ctx: _resource(ctx, name)
        case "any":
            return lambda ctx: tv.coalesce(ctx.attribute("span", name, within), _resource(ctx, name))
        case "intrinsic":
            return lambda ctx: _intrinsic(ctx, name)
        case "trace":
            return lambda ctx: _trace_intrinsic(ctx, name)
        case "dsl":
            if name in DSL_INTRINSICS:
                return lambda ctx: tv.coalesce(ctx.attribute("span", name, within), _intrinsic(ctx, name))
            return lambda ctx: ctx.attribute("span", name, within)


NumFn = Callable[[BatchContext], pa.Array | float]


def _compile_number(expr: Expr, within: str | None) -> NumFn:
    match expr:
        case Literal(kind="number" | "duration", value=int() | float() as number):
            value = float(number)
            return lambda ctx: value
        case Field():
            get = compile_field(expr, within)

            def field_num(ctx: BatchContext) -> pa.Array:
                num = get(ctx).num
                return pa.nulls(ctx.n, pa.float64()) if num is None else pc.cast(num, pa.float64())

            return field_num
        case Arith(op=op, left=left, right=right):
            lhs, rhs = _compile_number(left, within), _compile_number(right, within)
            return lambda ctx: _arith(op, lhs(ctx), rhs(ctx))
    msg = "arithmetic needs numbers, durations or fields"
    raise ValueError(msg)


def _arith(op: str, a: pa.Array | float, b: pa.Array | float) -> pa.Array | float:  # noqa: PLR0911 -- dispatch
    if isinstance(a, float) and isinstance(b, float):
        return scalar_arith(op, a, b)
    match op:
        case "+":
            return pc.add(a, b)
        case "-":
            return pc.subtract(a, b)
        case "*":
            return pc.multiply(a, b)
        case "/":
            return pc.divide(a, b)
        case "^":
            return pc.power(a, b)
    quotient = pc.floor(pc.divide(a, b))
    return pc.subtract(a, pc.multiply(quotient, b))


def scalar_arith(op: str, a: float, b: float) -> float:
    match op:
        case "+":
            return a + b
        case "-":
            return a - b
        case "*":
            return a * b
        case "/":
            return a / b if b else float("nan")
        case "^":
            return float(a**b)
    return a % b if b else float("nan")


def compile_value(expr: Expr, within: str | None = None) -> ValueFn:
    """Compile a field or arithmetic expression to a :class:`Typed` column."""
    if isinstance(expr, Field):
        return compile_field(expr, within)
    number = _compile_number(expr, within)

    def arith_value(ctx: BatchContext) -> Typed:
        value = number(ctx)
        if isinstance(value, float):
            value = pa.repeat(pa.scalar(value), ctx.n)
        return Typed(num=value)

    return arith_value


# -- predicates ---------------------------------------------------------------------


def compile_predicate(expr: Expr, within: str | None = None) -> MaskFn:
    """Compile a boolean field expression to a mask function (no nulls in the mask).

    With ``within``, the caller promises to AND the mask with "span name is
    ``within``", so attribute values are only needed on those spans.
    """
    match expr:
        case Const(value=value):
            return (lambda ctx: ctx.all_true) if value else (lambda ctx: ctx.all_false)
        case Logical(op=op, left=left, right=right):
            if _cheap(right) and not _cheap(left):
                left, right = right, left  # masks are null-free: both operators commute
            lhs, rhs = compile_predicate(left, within), compile_predicate(right, within)
            if op == "and":
                # A cheap side that no span satisfies settles the rest (``duration > 50ms``
                # before a regex on an attribute).
                return lambda ctx: and_then(ctx, lhs(ctx), rhs)
            return lambda ctx: _or_else(ctx, lhs(ctx), rhs)
        case Not(operand=operand):
            inner = compile_predicate(operand, within)
            return lambda ctx: pc.invert(inner(ctx))
        case Truthy(field=field):
            get = compile_field(field, within)

            def truthy(ctx: BatchContext) -> pa.Array:
                flag = get(ctx).flag
                return ctx.all_false if flag is None else flag.fill_null(False)

            return truthy
        case Compare(op=op, left=left, right=right):
            return _compile_compare(op, left, right, within)
    msg = "expected a condition"
    raise ValueError(msg)


def and_then(ctx: BatchContext, first: pa.Array, second: MaskFn) -> pa.Array:
    """``first & second(ctx)``, not evaluating ``second`` when no span is in ``first``."""
    if pc.any(first).as_py() is False:
        return first
    return pc.and_(first, second(ctx))


def _or_else(ctx: BatchContext, first: pa.Array, second: MaskFn) -> pa.Array:
    if pc.all(first).as_py() is True:
        return first
    return pc.or_(first, second(ctx))


def _cheap(expr: Expr) -> bool:
    """A condition on span columns only: no attribute, regex, trace or tree lookup."""
    match expr:
        case Const() | Literal():
            return True
        case Field(scope=scope, name=name):
            return scope == "intrinsic" and name not in ("childCount", "parentID")
        case Compare(op=op, left=a, right=b):
            return op not in ("=~", "!~", "matches", "contains") and _cheap(a) and _cheap(b)
        case Logical(left=a, right=b) | Arith(left=a, right=b):
            return _cheap(a) and _cheap(b)
        case Not(operand=a):
            return _cheap(a)
    return False


def _compile_compare(op: str, left: Expr, right: Expr, within: str | None) -> MaskFn:
    if isinstance(left, Literal) and not isinstance(right, Literal):
        flipped = {">": "<", ">=": "<=", "<": ">", "<=": ">="}.get(op, op)
        return _compile_compare(flipped, right, left, within)
    # Rules of a tenant often share conditions (status = error, http.status_code >= 500):
    # compute each once per batch. ``within`` is part of the key: such masks are exact
    # only on spans of that name.
    compare = _compile_compare_uncached(op, left, right, within)
    key = ("compare", op, left, right, within)

    def shared(ctx: BatchContext) -> pa.Array:
        result = ctx.memo(key, lambda: compare(ctx))
        assert isinstance(result, pa.Array)
        return result

    return shared


def _compile_compare_uncached(op: str, left: Expr, right: Expr, within: str | None) -> MaskFn:
    if (
        isinstance(left, Field)
        and left.scope == "intrinsic"
        and left.name in _ENUMS
        and op in EQUALITY_OPS
        and isinstance(right, Literal)
        and right.kind in ("enum", "string")
    ):
        return _enum_compare(op, *_ENUMS[left.name], str(right.value))
    value = compile_value(left, within)
    if not isinstance(right, Literal):
        other = compile_value(right, within)
        return lambda ctx: _compare_columns(ctx, op, value(ctx), other(ctx))
    if op in _NEGATIVE:
        positive = _literal_test(_NEGATIVE[op], right)

        def negative(ctx: BatchContext) -> pa.Array:
            typed = value(ctx)
            if right.kind == "nil":
                return _present(ctx, typed)
            scalar = pc.and_(_comparable(ctx, typed, right), pc.invert(positive(ctx, typed)))
            if typed.elements is None:
                return scalar
            in_array = _rows_in(ctx, typed.elements.rows)
            elem = positive(ctx, typed.elements.values)
            none = pc.invert(_rows_in(ctx, pc.filter(typed.elements.rows, elem)))
            return pc.or_(scalar, pc.and_(in_array, none))

        return negative
    test = _literal_test(op, right)
    # An array "contains" a value when one of its elements equals it.
    element_test = _literal_test("=", right) if op == "contains" else test

    def positive_fn(ctx: BatchContext) -> pa.Array:
        typed = value(ctx)
        mask = test(ctx, typed)
        if typed.elements is not None and right.kind != "nil":
            elem = element_test(ctx, typed.elements.values)
            mask = pc.or_(mask, _rows_in(ctx, pc.filter(typed.elements.rows, elem)))
        return mask

    return positive_fn


def _enum_compare(op: str, column: str, names: tuple[str, ...], name: str) -> MaskFn:
    """``status = error`` on the int8 codes: the answer of comparing :func:`_enum_names`
    with the name, without building a string per span."""

    def mask(ctx: BatchContext) -> pa.Array:
        codes = ctx.column(column)
        if name not in names:
            hit = ctx.all_false
        else:
            index = names.index(name)
            hit = pc.equal(codes, index)
            if index == 0:  # unknown codes read as names[0]
                unknown = pc.or_(pc.less(codes, 0), pc.greater_equal(codes, len(names)))
                hit = pc.or_(hit, unknown)
        if op == "!=":
            hit = pc.invert(hit)
        return hit if hit.null_count == 0 else hit.fill_null(False)

    return mask


def _rows_in(ctx: BatchContext, rows: pa.Array) -> pa.Array:
    return ctx.rows_mask(rows)


def _present(ctx: BatchContext, typed: Typed) -> pa.Array:
    return ctx.all_true if typed.present is None else typed.present


def _comparable(ctx: BatchContext, typed: Typed, lit: Literal) -> pa.Array:
    """Where ``typed`` holds a value of the literal's type (the domain of ``!=``)."""
    if lit.kind == "list":
        return _present(ctx, typed)
    col = _column_for(typed, lit.kind)
    return ctx.all_false if col is None else pc.is_valid(col)


def _column_for(typed: Typed, kind: LitKind) -> pa.Array | None:
    if kind in ("number", "duration"):
        return typed.num
    if kind == "bool":
        return typed.flag
    return typed.text


LitTest = Callable[[BatchContext, Typed], pa.Array]


def _literal_test(op: str, lit: Literal) -> LitTest:
    """A positive test of a typed column against ``lit`` (null-free mask)."""
    if lit.kind == "nil":
        return lambda ctx, t: pc.invert(_present(ctx, t))
    if op == "in":
        assert isinstance(lit.value, tuple)
        return _in_list(lit.value)
    kind = lit.kind
    value = lit.value
    if op in ("=~", "matches"):
        pattern = compile_regex(str(value))

        def regex(ctx: BatchContext, t: Typed) -> pa.Array:
            if t.text is None:
                return pa.repeat(pa.scalar(False), _length(ctx, t))
            return pc.match_substring_regex(t.text, pattern).fill_null(False)

        return regex
    if op == "contains":

        def contains(ctx: BatchContext, t: Typed) -> pa.Array:
            if kind == "string" and t.text is not None:
                return pc.match_substring(t.text, str(value)).fill_null(False)
            return pa.repeat(pa.scalar(False), _length(ctx, t))

        return contains
    compare = _PC_OPS[op]
    if kind in ("number", "duration") and isinstance(value, int | float):
        # Numeric columns are float64 (or int64 intrinsics); a float literal
        # compares with both, an int beyond 2**53 would not convert.
        value = float(value)

    rendered = tv.canonical_json(str(value)) if op == "=" and kind in ("string", "enum") else None

    def simple(ctx: BatchContext, t: Typed) -> pa.Array:
        if rendered is not None and t.raw is not None:
            return pc.equal(t.raw, rendered).fill_null(False)
        col = _column_for(t, kind)
        if col is None:
            return pa.repeat(pa.scalar(False), _length(ctx, t))
        result = compare(col, value)
        return result if result.null_count == 0 else result.fill_null(False)

    return simple


def _in_list(values: tuple[Scalar, ...]) -> LitTest:
    texts = pa.array([v for v in values if isinstance(v, str)], pa.string())
    nums = pa.array(
        [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)],
        pa.float64(),
    )
    flags = pa.array([v for v in values if isinstance(v, bool)], pa.bool_())
    rendered = [tv.canonical_json(v) for v in texts.to_pylist()]
    raw_texts = None if None in rendered else pa.array(rendered, pa.string())

    def any_of(ctx: BatchContext, t: Typed) -> pa.Array:
        result = pa.repeat(pa.scalar(False), _length(ctx, t))
        sets = {"text": texts, "num": nums, "flag": flags}
        if raw_texts is not None and t.raw is not None:
            # Strings matched on their JSON text (see canonical_json): no decoding.
            result = pc.is_in(t.raw, value_set=raw_texts).fill_null(False)
            del sets["text"]
        for part, value_set in sets.items():
            col = getattr(t, part) if len(value_set) else None  # decode only the parts needed
            if col is not None:
                hit = pc.is_in(pc.cast(col, value_set.type), value_set=value_set)
                result = pc.or_(result, hit.fill_null(False))
        return result

    return any_of


def _length(ctx: BatchContext, t: Typed) -> int:
    if t.raw is not None:
        return len(t.raw)
    columns = [c for c in (t.num, t.text, t.flag, t.present) if c is not None]
    length: int = len(columns[0]) if columns else ctx.n
    return length


def _scalar_literal(value: Scalar | tuple[Scalar, ...]) -> Literal:
    if isinstance(value, bool):
        return Literal("bool", value)
    if isinstance(value, int | float):
        return Literal("number", value)
    if value is None:
        return Literal("nil", None)
    return Literal("string", str(value))


def _compare_columns(ctx: BatchContext, op: str, a: Typed, b: Typed) -> pa.Array:
    if op not in _PC_OPS:
        msg = f"operator {op!r} needs a literal on its right-hand side"
        raise ValueError(msg)
    compare = _PC_OPS[op]
    result = ctx.all_false
    for x, y in ((a.num, b.num), (a.text, b.text), (a.flag, b.flag)):
        if x is not None and y is not None:
            result = pc.or_(result, compare(x, y).fill_null(False))
    return result
