"""The ``betrace`` command line, run in-process with typer's CliRunner (no broker needed)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner, Result

from betrace import __version__
from betrace.cli.main import app

ROOT = Path(__file__).resolve().parents[3]
RULES = ROOT / "config" / "rules"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _commands(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


COMMANDS = list(_commands(typer.main.get_command(app)))


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No outside BETRACE_* settings; the CLI's logging setup is undone afterwards."""
    for name in list(os.environ):
        if name.startswith("BETRACE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("BETRACE_RULES_DIR", str(RULES))
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("NO_COLOR", "1")
    logger = logging.getLogger("betrace")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    # The CLI points the package logger at the runner's (now closed) stderr.
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]
    os.environ.pop("BETRACE_CONFIG", None)  # exported by --config


def invoke(*args: str, **env: str) -> Result:
    result = CliRunner().invoke(app, list(args), env=env)
    result_text = ANSI.sub("", result.output)
    assert "Traceback" not in result_text
    return result


def text(result: Result) -> str:
    return ANSI.sub("", result.output)


def error_lines(result: Result) -> list[str]:
    return [line for line in text(result).splitlines() if line.startswith("error:")]


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0
    assert text(result).strip() == f"betrace {__version__}"


def test_no_arguments_shows_help() -> None:
    result = invoke()
    assert "Usage: betrace" in text(result)
    assert "rules" in text(result)


def test_every_command_is_covered() -> None:
    names = {" ".join(c) for c in COMMANDS}
    assert {"run", "produce", "demo", "signals tail", "dev up", "rules validate", "rules list"} <= names


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "betrace")
def test_help_of_every_command(command: tuple[str, ...]) -> None:
    for flag in ("--help", "-h"):
        result = invoke(*command, flag)
        assert result.exit_code == 0, text(result)
        assert f"Usage: betrace {' '.join(command)}".rstrip() in text(result)


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ((), ["--config", "--log-level", "--version", "demo", "run", "produce", "signals", "dev", "rules"]),
        (("produce",), ["--spans", "--tenants", "--violation-rate", "--seed", "--by-trace-id", "--truth"]),
        (("demo",), ["--spans", "--external", "--timeout"]),
        (("signals", "tail"), ["--from-beginning", "--count", "--timeout", "--json"]),
        (("dev", "up"), ["--brokers"]),
        (("dev", "down"), ["--clean"]),
        (("rules", "validate"), ["BETRACE_RULES_DIR"]),
        (("rules", "list"), ["--tenant"]),
    ],
)
def test_help_mentions_key_options(command: tuple[str, ...], options: list[str]) -> None:
    help_text = text(invoke(*command, "--help"))
    for option in options:
        assert option in help_text


def test_rules_validate_passes_on_repository_rules() -> None:
    result = invoke("rules", "validate")
    assert result.exit_code == 0, text(result)
    assert f"4 rule(s) for 2 tenant(s) in {RULES} are valid" in text(result)


def test_rules_validate_named_files() -> None:
    result = invoke("rules", "validate", str(RULES / "acme.yaml"), str(RULES / "default.yaml"))
    assert result.exit_code == 0, text(result)
    assert "4 rule(s) in 2 file(s) are valid" in text(result)


def test_rules_validate_reports_a_bad_rule(tmp_path: Path) -> None:
    bad = tmp_path / "acme.yaml"
    bad.write_text(
        "tenant: acme\nrules:\n  - id: broken\n    expression: when { a } sometimes { b }\n", encoding="utf-8"
    )
    result = invoke("rules", "validate", BETRACE_RULES_DIR=str(tmp_path))
    assert result.exit_code == 1
    [line] = error_lines(result)
    assert f"{bad}: rule 'broken'" in line


def test_rules_list_filters_by_tenant() -> None:
    result = invoke("rules", "list", "--files", "--tenant", "acme")
    assert result.exit_code == 0, text(result)
    rules = [line for line in text(result).splitlines() if line.startswith("acme/")]
    assert [line.split()[0] for line in rules] == ["acme/pii-audit@v1", "acme/payment-fraud-check@v1"]
    assert "default/" not in text(result)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BETRACE_TOPICS__PARTITIONS", "0"),
        ("BETRACE_IDLE_TIMEOUT_S", "soon"),
        ("BETRACE_BROKERS", "no-port"),
    ],
)
def test_bad_env_value_is_a_short_error(name: str, value: str) -> None:
    result = invoke("rules", "validate", **{name: value})
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    [line] = error_lines(result)
    assert line.startswith("error: invalid BeTrace settings")
    assert name in text(result)
    assert len(text(result).strip().splitlines()) <= 3  # the error line plus one line per problem


def test_bad_log_level_option_is_a_short_error() -> None:
    result = invoke("--log-level", "loud", "rules", "validate")
    assert result.exit_code == 1
    assert error_lines(result)
    assert "BETRACE_LOG_LEVEL" in text(result)


def test_config_file_option(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "acme.yaml").write_text((RULES / "acme.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    config = tmp_path / "betrace.toml"
    config.write_text(f'rules_dir = "{rules}"\n', encoding="utf-8")
    os.environ.pop("BETRACE_RULES_DIR")  # the file must be what points at the rules
    result = invoke("--config", str(config), "rules", "validate")
    assert result.exit_code == 0, text(result)
    assert "2 rule(s) for 1 tenant(s)" in text(result)


def test_missing_config_file_is_a_short_error(tmp_path: Path) -> None:
    result = invoke("-c", str(tmp_path / "nope.toml"), "rules", "list")
    assert result.exit_code == 1
    [line] = error_lines(result)
    assert "nope.toml does not exist" in line


def test_non_json_nested_env_value_is_a_short_error() -> None:
    result = CliRunner().invoke(app, ["rules", "validate"], env={"BETRACE_TOPICS": "partitions=4"})
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    assert error_lines(result)
