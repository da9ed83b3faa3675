"""``betrace signals count`` and ``betrace apikeys`` as the user runs them (registered on a test app)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
import typer
from typer.testing import CliRunner

from betrace.cli import query as query_cmd
from betrace.cli import serve as serve_cmd
from betrace.metrics import InMemoryHooks
from betrace.sinks.ledger import EmbeddedLedger, SignalLedger, tenant_ledger_path

app = typer.Typer()
signals_app = typer.Typer()
signals_app.command("count")(query_cmd.signals_count)
app.add_typer(signals_app, name="signals")
app.add_typer(serve_cmd.apikeys_app, name="apikeys")


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BETRACE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("BETRACE_TIGERBEETLE_ADDRESSES", raising=False)
    return tmp_path / "data"


def test_signals_count_reads_the_ledger(data_dir: Path) -> None:
    async def record() -> None:
        ledger = SignalLedger(EmbeddedLedger(tenant_ledger_path(data_dir, "acme")), hooks=InMemoryHooks())
        docs = [
            {"tenant": "acme", "rule_id": "r1", "rule_version": v, "trace_id": f"{i:032x}", "severity": "low"}
            for i in range(3)
            for v in (1, 2)
        ]
        await ledger.record(docs)
        await ledger.record(docs)
        await ledger.close()

    asyncio.run(record())
    result = CliRunner().invoke(app, ["signals", "count", "--rule", "r1", "--tenant", "acme", "--json"])
    assert result.exit_code == 0, result.output
    doc = orjson.loads(result.stdout)
    assert doc["total"] == 6
    assert doc["versions"] == [{"version": 1, "signals": 3}, {"version": 2, "signals": 3}]
    result = CliRunner().invoke(app, ["signals", "count", "--rule", "r1", "--tenant", "nobody"])
    assert result.exit_code == 0
    assert "no signals recorded" in result.stdout


def test_signals_count_without_a_ledger_fails_clearly(data_dir: Path) -> None:
    result = CliRunner().invoke(app, ["signals", "count", "--rule", "r1"])
    assert result.exit_code == 1
    assert "no embedded ledger" in result.output


def test_apikeys_create_list_revoke(data_dir: Path) -> None:
    runner = CliRunner()
    created = runner.invoke(app, ["apikeys", "create", "--tenant", "acme", "--name", "ci"])
    assert created.exit_code == 0, created.output
    token = created.stdout.strip().splitlines()[-1]
    assert token.startswith("btk_")
    # btk_<key id>_<secret>; the secret is urlsafe base64 and may itself contain "_".
    _, key_id, secret = token.split("_", 2)
    listed = runner.invoke(app, ["apikeys", "list", "--tenant", "acme"])
    assert key_id in listed.stdout
    assert secret
    assert secret not in listed.stdout
    assert runner.invoke(app, ["apikeys", "revoke", key_id, "--tenant", "globex"]).exit_code == 1
    assert runner.invoke(app, ["apikeys", "revoke", key_id, "--tenant", "acme"]).exit_code == 0
    assert "revoked" in runner.invoke(app, ["apikeys", "list"]).stdout
    assert runner.invoke(app, ["apikeys", "create", "--tenant", "bad tenant!"]).exit_code == 1
