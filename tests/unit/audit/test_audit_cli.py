"""``betrace audit list|show|chain|backfill`` as an operator runs them."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from betrace.audit.events import AuditEventType, EventRef
from betrace.audit.recorder import DuckDBAuditRecorder
from betrace.cli.main import app

T = AuditEventType


@pytest.fixture
def trail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, EventRef]:
    data = tmp_path / "data"
    monkeypatch.setenv("BETRACE_DATA_DIR", str(data))
    with DuckDBAuditRecorder(data / "audit.duckdb") as rec:
        worker = rec.record(T.WORKER_STARTED, actor="w", subject="worker 1")
        batch = rec.record(T.EVALUATION_BATCH, actor="w", subject="batch", tenant="acme", parent=worker)
        sig = rec.record(T.SIGNAL_EMITTED, actor="w", subject="sig", tenant="acme", parent=batch)
    return {"worker": worker, "batch": batch, "signal": sig}


def test_list_show_chain(trail: dict[str, EventRef]) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["audit", "list", "--json"])
    assert result.exit_code == 0, result.output
    docs = [orjson.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [d["event_type"] for d in docs] == ["worker.started", "evaluation.batch", "signal.emitted"]
    result = runner.invoke(app, ["audit", "list", "--system", "--since", "1h"])
    assert result.exit_code == 0
    assert "worker.started" in result.stdout
    assert "signal.emitted" not in result.stdout
    result = runner.invoke(app, ["audit", "list", "--limit", "1"])
    assert "--cursor" in result.stdout
    cursor = result.stdout.split("--cursor ")[1].split()[0]
    result = runner.invoke(app, ["audit", "list", "--limit", "1", "--cursor", cursor, "--json"])
    assert orjson.loads(result.stdout.splitlines()[0])["event_type"] == "evaluation.batch"
    result = runner.invoke(app, ["audit", "show", trail["batch"].event_id])
    assert result.exit_code == 0, result.output
    assert "children (1)" in result.stdout
    result = runner.invoke(app, ["audit", "chain", trail["batch"].event_id, "--json"])
    chain = orjson.loads(result.stdout)
    assert [d["event_id"] for d in chain["ancestors"]] == [trail["worker"].event_id]
    assert [d["event_id"] for d in chain["descendants"]] == [trail["signal"].event_id]
    result = runner.invoke(app, ["audit", "chain", trail["signal"].event_id])
    assert result.exit_code == 0
    assert "worker.started" in result.stdout


def test_bad_input_is_a_clear_error(trail: dict[str, EventRef]) -> None:
    runner = CliRunner()
    for args in (
        ["audit", "show", "nope"],
        ["audit", "list", "--type", "bogus"],
        ["audit", "list", "--since", "last tuesday"],
        ["audit", "list", "--cursor", "garbage"],
        ["audit", "list", "--tenant", "a", "--system"],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        assert "error:" in result.output
        assert "Traceback" not in result.output
    # Append-only: there is no command that changes or removes events.
    result = runner.invoke(app, ["audit", "--help"])
    assert not any(word in result.stdout for word in ("delete", "update", "purge"))
    result = runner.invoke(app, ["audit", "backfill"])
    assert result.exit_code == 0, result.output
    assert "nothing to fill" in result.output
