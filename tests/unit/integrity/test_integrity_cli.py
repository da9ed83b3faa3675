"""``betrace integrity`` commands on real files, including one another process holds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pyarrow as pa
from typer.testing import CliRunner

from betrace.cli.main import app
from betrace.config import load_settings, settings_env
from betrace.sinks.duckdb_store import TenantStore
from betrace.streams.schemas import SPAN_SCHEMA


def _spans(tmp_path: Path) -> None:
    row = {
        "tenant": "acme",
        "trace_id": "a" * 32,
        "span_id": "1" * 16,
        "parent_span_id": "f" * 16,
        "name": "op",
        "service": "svc",
        "kind": 1,
        "status_code": 0,
        "start_ns": 1,
        "end_ns": 2,
        "attributes": "{}",
        "resource_attributes": "{}",
        "produced_ms": 0,
    }
    store = TenantStore(tmp_path)
    store.upsert_spans("acme", pa.Table.from_pylist([row], schema=SPAN_SCHEMA))
    store.close()


def test_check_then_list_then_bad_options(tmp_path: Path) -> None:
    _spans(tmp_path)
    env = settings_env(load_settings(data_dir=tmp_path))
    runner = CliRunner()
    result = runner.invoke(app, ["integrity", "check", "--json"], env=env)
    assert result.exit_code == 0, result.output
    doc = orjson.loads(result.output.splitlines()[-1])
    assert doc["opened"] == {"orphan_span": 1, "missing_root": 1} and doc["traces"] == 1
    listed = runner.invoke(
        app, ["integrity", "anomalies", "--tenant", "acme", "--kind", "orphan_span"], env=env
    )
    assert listed.exit_code == 0 and "orphan_span" in listed.output
    for args, text in (
        (["integrity", "check", "--since", "yesterday"], "duration"),
        (["integrity", "check", "--tenant", "nobody"], "no data for tenant"),
        (["integrity", "anomalies", "--state", "closed"], "open or resolved"),
    ):
        bad = runner.invoke(app, args, env=env)
        assert bad.exit_code == 1 and "error:" in bad.output and text in bad.output, bad.output


def test_check_refuses_clearly_while_another_process_holds_the_file(tmp_path: Path) -> None:
    _spans(tmp_path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys, time; con = duckdb.connect(sys.argv[1]); "
            "print('held', flush=True); time.sleep(60)",
            str(tmp_path / "tenant=acme.duckdb"),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"held"
        env = settings_env(load_settings(data_dir=tmp_path))
        result = CliRunner().invoke(app, ["integrity", "check", "--tenant", "acme"], env=env)
        assert result.exit_code == 1, result.output
        assert "error:" in result.output and "GET /v1/anomalies" in result.output
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
