"""``betrace rules`` without a broker: validation, explain, and clear failures."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from betrace.cli.main import app

ROOT = Path(__file__).resolve().parents[3]
UNREACHABLE = "127.0.0.1:1"


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith("BETRACE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("BETRACE_RULES_DIR", str(ROOT / "config" / "rules"))
    monkeypatch.setenv("BETRACE_BROKERS", UNREACHABLE)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("NO_COLOR", "1")
    logger = logging.getLogger("betrace")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["rules", *args])
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def test_validate_expression_shows_line_column_and_caret() -> None:
    code, output = run("validate", "-e", "when { pii.access }\nalways { audit.log ")
    assert code == 1
    lines = output.splitlines()
    assert lines[0].startswith("error: line 2, column")
    assert lines[1] == "  always { audit.log "
    assert lines[2].strip() == "^"


def test_validate_expression_with_brackets_is_not_rich_markup() -> None:
    code, output = run("validate", "-e", "when { a.where(x in [bold]) } always { b }")
    assert (code, output.strip()) == (0, "valid betrace expression")
    code, output = run("validate", "-e", "when { a.where(x in [[bold]]) } always { b }")
    assert code == 1
    assert "[[bold]]" in output


def test_validate_files_and_languages() -> None:
    code, output = run("validate", str(ROOT / "config" / "rules" / "acme.yaml"))
    assert (code, output.strip()) == (0, "2 rule(s) in 1 file(s) are valid")
    code, _ = run("validate", "-e", "{ status = error }", "--language", "traceql")
    assert code == 0
    code, output = run("validate", "-e", "x", "--language", "cobol")
    assert code == 1
    assert "unknown rule language 'cobol'" in output


def otlp(names: list[str], trace: str) -> dict[str, object]:
    spans = [
        {"traceId": trace, "spanId": f"{i + 1:016x}", "name": n, "startTimeUnixNano": str(1000 * (i + 1)),
         "endTimeUnixNano": str(1000 * (i + 1) + 500)}
        for i, n in enumerate(names)
    ]  # fmt: skip
    return {"resourceSpans": [{"resource": {"attributes": []}, "scopeSpans": [{"spans": spans}]}]}


def test_test_explains_the_verdict_of_each_trace(tmp_path: Path) -> None:
    doc = otlp(["pii.access"], "a" * 32)
    doc["resourceSpans"] += otlp(["pii.access", "audit.log"], "b" * 32)["resourceSpans"]  # type: ignore[operator]
    trace = tmp_path / "trace.json"
    trace.write_bytes(orjson.dumps(doc))
    code, output = run("test", "-e", "when { pii.access } always { audit.log }", "--trace", str(trace))
    assert code == 0, output
    assert f"trace {'a' * 32}: VIOLATION" in output
    assert f"trace {'b' * 32}: PASS" in output
    assert "always { audit.log }: does not hold" in output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["test", "--trace", "x.json"], "give either TENANT/ID or --expression"),
        (["test", "-e", "when { a } always { b }", "--trace", "/nonexistent.json"], "cannot read"),
        (["add", "--tenant", "acme", "--id", "x", "-e", "when { a } always { b }"], "--reason is required"),
        (["add", "--tenant", "acme"], "give --file, or --tenant and --id"),
        (["show", "acme"], "expected TENANT/RULE_ID"),
        (["disable", "no tenant/x", "--reason", "r"], "invalid tenant"),
    ],
)
def test_usage_errors_exit_1_before_any_network(args: list[str], message: str) -> None:
    code, output = run(*args)
    assert code == 1
    assert message in output


def test_bad_trace_file_is_a_clear_error(tmp_path: Path) -> None:
    trace = tmp_path / "trace.json"
    trace.write_text("{not json", encoding="utf-8")
    code, output = run("test", "-e", "when { a } always { b }", "--trace", str(trace))
    assert code == 1
    assert "not usable OTLP/JSON" in output


def test_registry_commands_fail_clearly_without_a_broker() -> None:
    code, output = run("--timeout", "2", "list")
    assert code == 1
    assert output.startswith("error: cannot read the rules topic") or "cannot reach" in output


def test_list_files_works_offline() -> None:
    code, output = run("list", "--files", "--tenant", "acme")
    assert code == 0
    assert [line.split()[0] for line in output.splitlines() if line.startswith("acme/")] == [
        "acme/pii-audit@v1",
        "acme/payment-fraud-check@v1",
    ]


def test_help_has_examples() -> None:
    for command in ("add", "list", "show", "history", "disable", "test", "validate"):
        code, output = run(command, "--help")
        assert code == 0
        assert "betrace rules" in output, command
