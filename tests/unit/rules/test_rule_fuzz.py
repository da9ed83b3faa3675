"""Property tests: any input either parses or fails with RuleSyntaxError/RuleError."""

from __future__ import annotations

import contextlib

from hypothesis import given, settings
from hypothesis import strategies as st
from rules_spans import make_table

from betrace.errors import RuleError
from betrace.rules.engine import compile_rule
from betrace.rules.explain import validate
from betrace.rules.model import Rule

VOCABULARY = [
    "when", "always", "never", "and", "or", "not", "count", "(", ")", "{", "}", "[", "]", ",",
    ".", ".where(", "a", "b.c", "x", "==", "!=", ">", ">=", "<", "<=", "=", "=~", "!~", "&&",
    "||", "!", ">>", "<<", "~", "!<", "&>>", "|", "count()", "avg(duration)", "span.x",
    "resource.y", ".z", "status", "error", "1", "-2.5", "30s", "1h30m", '"s"', "'t'", "nil",
    "true", "in", "matches", "contains", "followed_by", "within", "from", "start", "span:name",
    "trace:duration", "by(", "select(", "\n", "//c\n",
]  # fmt: skip
LANGUAGES = ["betrace", "traceql", "sequence"]


TABLE = make_table(
    {
        "t": [
            {"name": "a", "id": "1", "attrs": {"x": 1, "y": "s", "z": [1, "q"]}},
            {"name": "b.c", "id": "2", "parent": "1", "status": "error", "attrs": {"x": "1"}},
        ]
    }
)


def _check(text: str, language: str) -> None:
    with contextlib.suppress(RuleError):
        validate(text, language)
        # What validates must also compile and evaluate without crashing.
        rule = Rule(id="f", tenant="fuzz", name="f", expression=text, language=language)  # type: ignore[arg-type]
        compile_rule(rule).evaluate(TABLE)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80), st.sampled_from(LANGUAGES))
def test_arbitrary_text(text: str, language: str) -> None:
    _check(text, language)


@settings(max_examples=600, deadline=None)
@given(st.lists(st.sampled_from(VOCABULARY), max_size=30), st.sampled_from(LANGUAGES))
def test_token_soup(tokens: list[str], language: str) -> None:
    _check(" ".join(tokens), language)
