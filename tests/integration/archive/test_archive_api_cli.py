"""Hot and cold through the real HTTP API and the CLI: same answers before and after archiving."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import duckdb
import pytest
from typer.testing import CliRunner

from betrace.api.http import ReadOnlyStore, start_api_server
from betrace.api.keys import ApiKeyStore
from betrace.archive.coldread import ColdCatalog
from betrace.archive.synthetic import fill_day
from betrace.cli.main import app
from betrace.sinks.cold import FilesystemColdStorage

HOLD = "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('held', flush=True); time.sleep(60)"
HOLD = "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('held', flush=True); time.sleep(60)"
TODAY = dt.datetime.now(dt.UTC).date()
DAYS = [TODAY - dt.timedelta(days=k) for k in (3, 2)]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    con = duckdb.connect(str(d / "tenant=acme.duckdb"))
    for day in DAYS:
        fill_day(con, "acme", day, spans=2_000, signals=15)
    con.close()
    return d


def cli(data: Path, *args: str) -> Any:
    env = {"BETRACE_DATA_DIR": str(data), "BETRACE_ARCHIVE__HOT_DAYS": "0", "COLUMNS": "200"}
    return CliRunner().invoke(app, list(args), env=env)


async def _fetch_all(url: str, token: str, trace_ids: list[str]) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    out: dict[str, Any] = {"traces": [], "signals": [], "by_id": []}
    async with aiohttp.ClientSession(headers=headers) as session:
        for path, key in (("/v1/traces", "traces"), ("/v1/signals", "signals")):
            params: dict[str, str] = {"limit": "150"}
            while True:
                async with session.get(url + path, params=params) as resp:
                    assert resp.status == 200, await resp.text()
                    doc = await resp.json()
                out[key] += doc["items"]
                if not doc["next_cursor"]:
                    break
                params = {"limit": "150", "cursor": doc["next_cursor"]}
        for trace_id in trace_ids:
            async with session.get(f"{url}/v1/traces/{trace_id}") as resp:
                assert resp.status == 200
                out["by_id"].append(await resp.json())
        params = {"service": "api", "attribute": "user.id=u3", "limit": "1000"}
        async with session.get(url + "/v1/traces", params=params) as resp:
            out["filtered"] = (await resp.json())["items"]
    return out


def _serve_and_fetch(data: Path, token: str, trace_ids: list[str]) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        cold = ColdCatalog(FilesystemColdStorage(data / "cold"))
        server = await start_api_server(ReadOnlyStore(data), ApiKeyStore(data / "apikeys.json"), cold=cold)
        try:
            return await _fetch_all(server.url, token, trace_ids)
        finally:
            await server.stop()

    return asyncio.run(run())


def test_http_api_answers_the_same_before_and_after_archiving(data: Path) -> None:
    token = ApiKeyStore(data / "apikeys.json").create("acme")[1]
    con = duckdb.connect(str(data / "tenant=acme.duckdb"), read_only=True)
    ids = [
        r[0] for r in con.execute("SELECT DISTINCT trace_id FROM spans ORDER BY trace_id LIMIT 5").fetchall()
    ]
    con.close()
    before = _serve_and_fetch(data, token, ids)
    assert len(before["traces"]) == 400 and len(before["signals"]) == 30 and before["filtered"]
    result = cli(data, "archive", "run", "--date", str(DAYS[0]))
    assert result.exit_code == 0, result.output
    middle = _serve_and_fetch(data, token, ids)
    result = cli(data, "archive", "run")
    assert result.exit_code == 0, result.output
    assert "cleaned" in result.output
    after = _serve_and_fetch(data, token, ids)
    assert middle == before
    assert after == before


def test_cli_status_stats_and_cleanup_dry_run(data: Path) -> None:
    assert "nothing archived yet" in cli(data, "archive", "status").output
    assert cli(data, "archive", "run").exit_code == 0
    status = cli(data, "archive", "status")
    assert status.exit_code == 0 and status.output.count("cleaned") == 4
    stats = cli(data, "storage", "stats")
    assert stats.exit_code == 0, stats.output
    lines = [line for line in stats.output.splitlines() if "acme" in line]
    assert len(lines) == 2 and "4,000" in lines[1] and str(DAYS[0]) in lines[1]
    env_ttl = {"BETRACE_ARCHIVE__SPANS_TTL_DAYS": "1"}
    runner = CliRunner()
    dry = runner.invoke(
        app, ["storage", "cleanup"], env={"BETRACE_DATA_DIR": str(data), "COLUMNS": "200", **env_ttl}
    )
    assert dry.exit_code == 0, dry.output
    assert "would remove 2 archived unit(s)" in dry.output and "dry run" in dry.output
    assert len(list((data / "cold").rglob("spans-*.parquet"))) == 2  # nothing removed
    applied = runner.invoke(
        app,
        ["storage", "cleanup", "--apply"],
        env={"BETRACE_DATA_DIR": str(data), "COLUMNS": "200", **env_ttl},
    )
    assert applied.exit_code == 0 and "removed 2" in applied.output
    assert list((data / "cold").rglob("spans-*.parquet")) == []


def test_bad_input_gets_clear_errors(data: Path) -> None:
    bad = cli(data, "archive", "run", "--date", "yesterday")
    assert bad.exit_code == 1 and "expected YYYY-MM-DD" in bad.output
    today = cli(data, "archive", "run", "--date", str(TODAY))
    assert today.exit_code == 1 and "only days before today" in today.output
    missing = cli(data, "archive", "status", "--tenant", "nobody")
    assert missing.exit_code == 1 and "has no data" in missing.output
    assert "Traceback" not in bad.output + today.output + missing.output


def test_cli_refuses_clearly_while_a_worker_holds_the_tenant_file(data: Path) -> None:
    holder = subprocess.Popen(  # stands in for the worker: another process holding the file for writing
        [
            sys.executable,
            "-c",
            HOLD,
            str(data / "tenant=acme.duckdb"),
        ],
        stdout=subprocess.PIPE,
        env={**os.environ},
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"held"
        result = cli(data, "archive", "run")
        assert result.exit_code == 1
        assert "held by a running worker" in result.output and "stop the worker" in result.output
        assert "Traceback" not in result.output
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    time.sleep(0.1)
    assert cli(data, "archive", "run").exit_code == 0
