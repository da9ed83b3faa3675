"""Table-driven conformance suite: tests/conformance/*.yaml.

Every case is checked twice: on a batch holding only its trace, and on one
batch holding every trace of the file, so that verdicts cannot leak between
traces evaluated together.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml
from rules_spans import BASE_NS, make_table

from betrace.rules.engine import compile_rule
from betrace.rules.model import Rule, Verdict

CONFORMANCE = Path(__file__).resolve().parents[2] / "conformance"
FILES = sorted(CONFORMANCE.glob("*.yaml"))


@functools.cache
def _load(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as fh:
        data: dict[str, Any] = yaml.safe_load(fh)
    traces = dict(data.get("traces", {}))
    for case in data["cases"]:
        if not isinstance(case["trace"], str):
            traces[case["id"]] = case["trace"]
    data["all_traces"] = traces
    return data


@functools.cache
def _batch(path: Path) -> pa.Table:
    return make_table(_load(path)["all_traces"])


def _cases() -> list[Any]:
    return [
        pytest.param(path, case, id=f"{path.stem}:{case['id']}")
        for path in FILES
        for case in _load(path)["cases"]
    ]


def _trace_name(case: dict[str, Any]) -> str:
    return case["trace"] if isinstance(case["trace"], str) else case["id"]


def _check(path: Path, case: dict[str, Any], table: pa.Table) -> None:
    data = _load(path)
    rule = Rule(
        id=case["id"],
        tenant="t1",
        name=case["id"],
        expression=case["rule"],
        language=case.get("language", data["language"]),
    )
    compiled = compile_rule(rule)
    now_ns = None if "now_ms" not in case else BASE_NS + case["now_ms"] * 1_000_000
    trace = _trace_name(case)
    verdicts = compiled.verdicts(table, now_ns)
    assert verdicts[trace] == Verdict(case["expect"]), case["rule"]
    violations = {v.trace_id: v for v in compiled.evaluate(table, now_ns)}
    assert (trace in violations) == (case["expect"] == "violation")
    if "spans" in case:
        assert list(violations[trace].span_ids) == sorted(case["spans"])


@pytest.mark.parametrize(("path", "case"), _cases())
def test_single_trace(path: Path, case: dict[str, Any]) -> None:
    name = _trace_name(case)
    _check(path, case, make_table({name: _load(path)["all_traces"][name]}))


@pytest.mark.parametrize(("path", "case"), _cases())
def test_in_shared_batch(path: Path, case: dict[str, Any]) -> None:
    _check(path, case, _batch(path))


def test_suite_size() -> None:
    assert sum(len(_load(p)["cases"]) for p in FILES) >= 150
