"""Integrity checks through the real pipeline: flagged at close, served by the worker's API,
counted in /metrics, resolved by an on-demand recheck once the missing parent arrived."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from typer.testing import CliRunner

from betrace.api.keys import KEYS_FILE, ApiKeyStore
from betrace.cli.main import app
from betrace.config import Settings, settings_env
from betrace.dev.worker import WorkerProcess
from betrace.workload.generator import SpanSpec, TraceGenerator, TraceSpec
from betrace.workload.otlp import batch_messages
from betrace.workload.producer import produce
from tests.integration.helpers import run_worker_over, wait_until_drained

MS = 1_000_000


def _free_ports(n: int) -> list[int]:
    """Distinct free ports (all bound at once, so none is handed out twice)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _span(sid: int, parent: int, start_ms: int, base: int) -> SpanSpec:
    return SpanSpec(
        span_id=sid.to_bytes(8, "big"),
        parent_span_id=parent.to_bytes(8, "big") if parent else b"",
        name=f"op-{sid}",
        service="svc",
        kind=1,
        start_ns=base + start_ms * MS,
        end_ns=base + start_ms * MS + 5 * MS,
    )


def broken_traces(base: int) -> tuple[list[TraceSpec], SpanSpec]:
    """An orphan (its parent comes later), a child 2 s before its parent, a rootless trace."""
    late_parent = _span(0x0F, 1, 3, base)
    orphan = TraceSpec("acme", bytes.fromhex("a1" * 16), [_span(1, 0, 0, base), _span(2, 0x0F, 4, base)])
    early = TraceSpec("acme", bytes.fromhex("b2" * 16), [_span(3, 0, 3000, base), _span(4, 3, 1000, base)])
    rootless = TraceSpec("acme", bytes.fromhex("c3" * 16), [_span(5, 0x77, 0, base), _span(6, 5, 1, base)])
    return [orphan, early, rootless], late_parent


async def _get(url: str, token: str, **params: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, params=params, headers={"Authorization": f"Bearer {token}"}) as resp,
    ):
        raw = await resp.read()
        assert resp.content_type == "application/json", (resp.status, raw[:300])
        return resp.status, orjson.loads(raw)


def _anomaly_keys(items: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(i["kind"], i["trace_id"], i["span_id"]) for i in items}


def test_anomalies_at_close_api_metrics_and_recheck(pipeline_settings: Settings, tmp_path: Path) -> None:
    api_port, web_port = _free_ports(2)
    cfg = pipeline_settings.model_copy(update={"api_port": api_port, "web_port": web_port})
    _, token = ApiKeyStore(cfg.data_dir / KEYS_FILE).create("acme")
    gen = TraceGenerator(tenants=("acme",), violation_rate=0.1, seed=13)
    clean = list(gen.traces(2_000))
    broken, late_parent = broken_traces(time.time_ns())
    expected = {
        ("orphan_span", "a1" * 16, "0000000000000002"),
        ("child_before_parent", "b2" * 16, "0000000000000004"),
        ("orphan_span", "c3" * 16, "0000000000000005"),
        ("missing_root", "c3" * 16, ""),
    }
    asyncio.run(produce(cfg, list(batch_messages(clean + broken, spans_per_message=300))))
    worker = WorkerProcess(cfg, tmp_path / "w1.log")
    worker.start()
    try:
        wait_until_drained(cfg, worker)
        deadline = time.monotonic() + 20
        found: set[tuple[str, str, str]] = set()
        while time.monotonic() < deadline and found != expected:
            status, body = asyncio.run(_get(f"http://127.0.0.1:{api_port}/v1/anomalies", token))
            assert status == 200, body
            found = _anomaly_keys(body["items"])
            time.sleep(0.5)
        # Exactly the planted anomalies: the generated (clean) traces raise none.
        assert found == expected, worker.log_tail()
        status, body = asyncio.run(
            _get(f"http://127.0.0.1:{api_port}/v1/anomalies", token, kind="missing_root", state="open")
        )
        assert status == 200 and [i["trace_id"] for i in body["items"]] == ["c3" * 16]
        status, page = asyncio.run(_get(f"http://127.0.0.1:{api_port}/v1/anomalies", token, limit="3"))
        assert status == 200 and len(page["items"]) == 3 and page["next_cursor"]
        status, rest = asyncio.run(
            _get(f"http://127.0.0.1:{api_port}/v1/anomalies", token, limit="3", cursor=page["next_cursor"])
        )
        assert _anomaly_keys(page["items"] + rest["items"]) == expected
        status, runs = asyncio.run(_get(f"http://127.0.0.1:{api_port}/v1/runs", token))
        assert status == 200 and [r["kind"] for r in runs["items"]] == ["worker"]
        status, one = asyncio.run(
            _get(f"http://127.0.0.1:{api_port}/v1/runs/{runs['items'][0]['run_id']}", token)
        )
        assert status == 200 and one["state"] == "running"
        status, _ = asyncio.run(_get(f"http://127.0.0.1:{api_port}/v1/anomalies", token, kind="bogus"))
        assert status == 400

        async def metrics() -> str:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{web_port}/metrics") as resp,
            ):
                return await resp.text()

        text = asyncio.run(metrics())
        assert 'betrace_anomalies_total{kind="orphan_span",source="close"} 2.0' in text, text[-3000:]
        assert 'betrace_anomalies_total{kind="missing_root",source="close"} 1.0' in text
    finally:
        assert worker.stop() == 0, worker.log_tail()

    # The missing parent arrives late; a recheck (worker stopped, so the CLI may open the file) resolves it.
    orphan_trace = broken[0]
    run_worker_over(
        cfg,
        tmp_path / "w2.log",
        list(batch_messages([TraceSpec("acme", orphan_trace.trace_id, [late_parent])], spans_per_message=10)),
    )
    env = settings_env(cfg.model_copy(update={"api_port": 0, "web_port": 0}))
    result = CliRunner().invoke(app, ["integrity", "check", "--tenant", "acme", "--json"], env=env)
    assert result.exit_code == 0, result.output
    outcome = orjson.loads(result.output.strip().splitlines()[-1])
    assert outcome["resolved"] == {"orphan_span": 1}
    assert outcome["opened"] == {}
    result = CliRunner().invoke(app, ["integrity", "anomalies", "--state", "resolved", "--json"], env=env)
    resolved = [orjson.loads(line) for line in result.output.splitlines()]
    assert _anomaly_keys(resolved) == {("orphan_span", "a1" * 16, "0000000000000002")}
    # Re-checking again changes nothing and duplicates nothing.
    result = CliRunner().invoke(app, ["integrity", "check", "--json"], env=env)
    assert orjson.loads(result.output.strip().splitlines()[-1])["opened"] == {}
    result = CliRunner().invoke(app, ["integrity", "anomalies", "--json"], env=env)
    assert len(result.output.splitlines()) == 4
    bad = CliRunner().invoke(app, ["integrity", "anomalies", "--kind", "nope"], env=env)
    assert bad.exit_code == 1 and "error:" in bad.output


def test_the_worker_recheck_resolves_when_the_parent_arrives_late(
    pipeline_settings: Settings, tmp_path: Path
) -> None:
    (api_port,) = _free_ports(1)
    integrity = pipeline_settings.integrity.model_copy(update={"recheck_interval_s": 1.0})
    cfg = pipeline_settings.model_copy(update={"api_port": api_port, "integrity": integrity})
    _, token = ApiKeyStore(cfg.data_dir / KEYS_FILE).create("acme")
    broken, late_parent = broken_traces(time.time_ns())
    orphan = broken[0]
    url = f"http://127.0.0.1:{api_port}/v1/anomalies"

    def states() -> dict[tuple[str, str, str], str]:
        status, body = asyncio.run(_get(url, token, trace_id=orphan.trace_id.hex()))
        assert status == 200, body
        return {(i["kind"], i["trace_id"], i["span_id"]): i["state"] for i in body["items"]}

    key = ("orphan_span", orphan.trace_id.hex(), "0000000000000002")
    asyncio.run(produce(cfg, list(batch_messages([orphan], spans_per_message=10))))
    worker = WorkerProcess(cfg, tmp_path / "w.log")
    worker.start()
    try:
        wait_until_drained(cfg, worker)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and states().get(key) != "open":
            time.sleep(0.3)
        assert states() == {key: "open"}, worker.log_tail()
        # The parent arrives after its trace closed, in the same worker session.
        late = TraceSpec("acme", orphan.trace_id, [late_parent])
        asyncio.run(produce(cfg, list(batch_messages([late], spans_per_message=10))))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and states().get(key) != "resolved":
            time.sleep(0.3)
        assert states() == {key: "resolved"}, worker.log_tail()
    finally:
        assert worker.stop() == 0, worker.log_tail()
