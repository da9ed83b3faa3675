"""Shortcuts in rule evaluation give the answers of the general path.

Strings compared on their JSON text, numbers cast without a type mask, enum
intrinsics compared on their codes and conditions skipped once the other side
of ``&&``/``||`` decides: each case below pins the semantics of the general
path (escapes, NaN/Infinity literals, unknown enum codes) that a shortcut must
keep.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest
from rules_spans import make_table

from betrace.rules.engine import compile_rule
from betrace.rules.model import Rule

TRACE = "a" * 32


def _table(spans: list[dict[str, Any]], attributes: list[str] | None = None) -> pa.Table:
    table = make_table({TRACE: spans})
    if attributes is not None:  # raw JSON documents, as a non-orjson producer may write them
        index = table.schema.get_field_index("attributes")
        table = table.set_column(index, table.schema.field(index), pa.array(attributes, pa.string()))
    return table


def _matched(expression: str, table: pa.Table, language: str = "traceql") -> list[str]:
    """Span ids a TraceQL query matches (or a DSL rule cites) in the single trace."""
    rule = Rule(id="r", tenant="t1", name="r", expression=expression, language=language)  # type: ignore[arg-type]
    violations = compile_rule(rule).evaluate(table)
    return sorted(span for v in violations for span in v.span_ids)


STRINGS = [
    '{"k": "\\u00e9"}',  # an escape DuckDB decodes
    '{"k": "é"}',
    '{"k": "say \\"hi\\""}',
    '{"k": "u7"}',
    '{"k": "u70"}',
    '{"k": 7}',
    '{"k": "7"}',
    '{"k": ["u7", "x"]}',
    "{}",
]


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ('{ span.k = "é" }', ["s0", "s1"]),
        ('{ span.k = "say \\"hi\\"" }', ["s2"]),
        ('{ span.k = "u7" }', ["s3", "s7"]),
        ('{ span.k = "7" }', ["s6"]),
        ("{ span.k = 7 }", ["s5"]),
        ('{ span.k != "u7" }', ["s0", "s1", "s2", "s4", "s6"]),
    ],
)
def test_string_equality_matches_decoded_text(expression: str, expected: list[str]) -> None:
    table = _table([{"name": "op"} for _ in STRINGS], STRINGS)
    assert _matched(expression, table) == expected


def test_in_list_matches_decoded_text() -> None:
    table = _table([{"name": "op"} for _ in STRINGS], STRINGS)
    rule = 'when { op.where(k in [u7, "é", 7]) } always { missing }'
    assert _matched(rule, table, "betrace") == ["s0", "s1", "s3", "s5", "s7"]


NUMBERS = ['{"n": 5}', '{"n": -2.5}', '{"n": 1e400}', '{"n": "9"}', '{"n": true}', "{}"]


@pytest.mark.parametrize(
    ("documents", "positive", "negative"),
    [
        (NUMBERS, ["s0", "s2"], ["s1"]),
        # NaN and Infinity are read by DuckDB but are not JSON numbers; -Infinity starts like one.
        ([*NUMBERS, '{"n": NaN}', '{"n": Infinity}', '{"n": -Infinity}'], ["s0", "s2"], ["s1", "s8"]),
        (['{"n": 5}', '{"n": 0}', '{"n": 1e400}'], ["s0", "s2"], []),
    ],
)
def test_numbers_only_from_json_numbers(
    documents: list[str], positive: list[str], negative: list[str]
) -> None:
    table = _table([{"name": "op"} for _ in documents], documents)
    assert _matched("{ span.n > 0 }", table) == positive
    assert _matched("{ span.n < 0 }", table) == negative


def test_enum_intrinsics_compare_codes_like_names() -> None:
    spans = [
        {"name": "op", "status": s, "kind": k}
        for s, k in [("unset", "server"), ("ok", "client"), ("error", "client")]
    ]
    table = _table([*spans, {"name": "odd"}])
    codes = pa.array([0, 1, 2, 7], pa.int8())  # 7: an unknown status code reads as "unset"
    index = table.schema.get_field_index("status_code")
    table = table.set_column(index, table.schema.field(index), codes)
    assert _matched("{ status = unset }", table) == ["s0", "s3"]
    assert _matched("{ status = error }", table) == ["s2"]
    assert _matched('{ status != "error" }', table) == ["s0", "s1", "s3"]
    assert _matched("{ kind = client && status = error }", table) == ["s2"]
    assert _matched('{ status = "bogus" }', table) == []
    assert _matched('{ status != "bogus" }', table) == ["s0", "s1", "s2", "s3"]


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ('{ span.m =~ "DEL.*" && duration > 50ms }', ["s1"]),
        ('{ duration > 500ms && span.m =~ "DEL.*" }', []),
        ('{ span.m =~ "DEL.*" || duration > 0ms }', ["s0", "s1", "s2"]),
        ('{ span.m =~ "DEL.*" || duration > 500ms }', ["s0", "s1"]),
        ('{ !(duration > 500ms) && span.m = "GET" }', ["s2"]),
    ],
)
def test_conditions_settled_by_one_side(expression: str, expected: list[str]) -> None:
    table = _table(
        [
            {"name": "op", "dur": 10, "attrs": {"m": "DELETE"}},
            {"name": "op", "dur": 80, "attrs": {"m": "DELETE"}},
            {"name": "op", "dur": 90, "attrs": {"m": "GET"}},
        ]
    )
    assert _matched(expression, table) == expected
