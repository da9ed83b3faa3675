"""Syntax errors, bounds and regex safety of the rule languages."""

from __future__ import annotations

import pytest

from betrace.errors import RuleError, RuleSyntaxError
from betrace.rules.diagnostics import MAX_EXPRESSION_LENGTH, MAX_NESTING_DEPTH, format_error
from betrace.rules.engine import compile_rule
from betrace.rules.explain import validate
from betrace.rules.model import Rule


def _compile(expression: str, language: str = "betrace") -> None:
    compile_rule(Rule(id="r", tenant="t", name="r", expression=expression, language=language))  # type: ignore[arg-type]


def _error(expression: str, language: str = "betrace") -> RuleSyntaxError:
    with pytest.raises(RuleSyntaxError) as info:
        _compile(expression, language)
    return info.value


def test_error_names_line_column_caret_and_expectation() -> None:
    err = _error("when { pii.access\nalways { audit.log }")
    assert (err.line, err.column) == (2, 1)
    text = str(err)
    assert text.splitlines() == [
        "line 2, column 1: expected '}' to close 'when {' but found 'always'",
        "  always { audit.log }",
        "  ^",
    ]


def test_caret_points_inside_line() -> None:
    err = _error("when { pii.access } always { audit.log ) }")
    assert (err.line, err.column) == (1, 40)
    assert str(err).splitlines()[2] == "  " + " " * 39 + "^"


@pytest.mark.parametrize(
    ("expression", "language", "fragment", "column"),
    [
        ("pii.access", "betrace", "expected 'when'", 1),
        ("when { pii.access }", "betrace", "expected 'always' or 'never' but found end of input", 20),
        ("when { a } always { b } always { c }", "betrace", "duplicate 'always' clause", 25),
        ("when { } always { b }", "betrace", "expected a condition inside 'when { }'", 8),
        ("when { a.where(x >) } always { b }", "betrace", "expected a value", 19),
        ("when { a.where(x in 3) } always { b }", "betrace", "needs a list", 21),
        ("when { a.where(x > true) } always { b }", "betrace", "booleans only support", 20),
        ("when { count(a) } always { b }", "betrace", "expected a comparison", 17),
        ("when { a } always { b } extra", "betrace", "expected end of rule but found 'extra'", 25),
        ("when { a $ b } always { c }", "betrace", "unexpected character '$'", 10),
        ('when { a.where(x == "abc) } always { b }', "betrace", "unterminated string", 21),
        ("{ span.foo = }", "traceql", "expected a field", 14),
        ("{ span.foo = 1", "traceql", "expected '}' to close the spanset filter", 15),
        ("{ foo = 1 }", "traceql", "unknown identifier 'foo'", 3),
        ('{ event.name = "x" }', "traceql", "'event' scope is not available", 3),
        ("{ span:nope = 1 }", "traceql", "expected one of span:name", 8),
        ("{ a } | rate()", "traceql", "unknown identifier 'a'", 3),
        ("{ } | rate()", "traceql", "metrics function 'rate' is not supported", 7),
        ('{ } | count() > "x"', "traceql", "expected a number or duration", 15),
        ("{ 1 = 2 }", "traceql", "needs at least one field", 5),
        ("{ (span.x = 1) + 2 > 3 }", "traceql", "not a condition", 16),
        ("{ } >", "traceql", "expected '{' to start a spanset filter", 6),
        ("a followed_by b", "sequence", "expected 'within'", 16),
        ("a followed_by b within 30", "sequence", "expected a duration", 24),
        ("a then b within 30s", "sequence", "expected 'followed_by' but found 'then'", 3),
        ("a followed_by b within 3q", "sequence", "malformed number", 24),
    ],
)
def test_syntax_errors(expression: str, language: str, fragment: str, column: int) -> None:
    err = _error(expression, language)
    assert fragment in str(err)
    assert err.column == column


def test_validate_matches_compile() -> None:
    validate("when { a } always { b }", "betrace")
    validate("{ status = error }", "traceql")
    validate("a followed_by b within 1s", "sequence")
    with pytest.raises(RuleSyntaxError):
        validate("when { a }", "betrace")
    with pytest.raises(RuleError):
        validate("x", "cel")


def test_unknown_language_is_rule_error() -> None:
    with pytest.raises(RuleError, match="unknown language"):
        _compile("x", "cel")


def test_expression_length_bound() -> None:
    long = "when { a } always { " + " or ".join(["b"] * MAX_EXPRESSION_LENGTH) + " }"
    err = _error(long)
    assert f"the limit is {MAX_EXPRESSION_LENGTH}" in str(err)


def test_empty_expression() -> None:
    assert "empty" in str(_error("   "))


@pytest.mark.parametrize(
    ("template", "language"),
    [
        ("when {{ {open}a{close} }} always {{ b }}", "betrace"),
        ("when {{ a.where({open}x > 1{close}) }} always {{ b }}", "betrace"),
        ("{open}{{ }}{close}", "traceql"),
        ("{{ {open}span.a = 1{close} }}", "traceql"),
    ],
)
def test_nesting_bound(template: str, language: str) -> None:
    ok = template.format(open="(" * 20, close=")" * 20)
    _compile(ok, language)
    deep = template.format(open="(" * (MAX_NESTING_DEPTH + 1), close=")" * (MAX_NESTING_DEPTH + 1))
    assert "nests deeper than" in str(_error(deep, language))


def test_deep_not_chain_is_bounded() -> None:
    assert "nests deeper" in str(_error("when { " + "not " * 200 + "a } always { b }"))


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("(a", "missing )"),
        ("(a)\\\\1", "invalid escape"),
        ("(?=a)", "invalid"),
    ],
)
def test_regex_rejected_with_reason(pattern: str, reason: str) -> None:
    err = _error(f'{{ span.x =~ "{pattern}" }}', "traceql")
    assert "invalid regular expression" in str(err)
    assert reason in str(err)
    assert err.column == 13


def test_regex_too_complex_rejected() -> None:
    err = _error('{ span.x =~ "(((a{100}){100}){100})" }', "traceql")
    assert "too complex" in str(err) or "invalid regular expression" in str(err)


def test_dsl_matches_rejects_bad_regex() -> None:
    assert "invalid regular expression" in str(_error('when { a.where(x matches "[") } always { b }'))


def test_format_error_helper() -> None:
    assert format_error("ab\ncd", 2, 2, "boom") == "line 2, column 2: boom\n  cd\n   ^"


def test_no_eval_or_exec_in_engine() -> None:
    from pathlib import Path

    import betrace.rules

    root = Path(betrace.rules.__file__).parent
    for source in root.rglob("*.py"):
        text = source.read_text(encoding="utf-8")
        assert "eval(" not in text.replace(".evaluate(", "").replace("def evaluate(", "")
        assert "exec(" not in text
