"""The query API over real HTTP (127.0.0.1, port 0) on real DuckDB files and a real ledger."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pyarrow as pa
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from betrace.api.http import ApiServer, ReadOnlyStore, start_api_server
from betrace.api.keys import ApiKeyStore
from betrace.metrics import InMemoryHooks
from betrace.sinks.duckdb_store import TenantStore
from betrace.sinks.ledger import EmbeddedLedger, SignalLedger
from betrace.streams.schemas import SPAN_SCHEMA


def spans(trace: int, tenant: str, n: int = 2, service: str = "api") -> pa.Table:
    start = time.time_ns()
    rows = [
        {
            "tenant": tenant,
            "trace_id": f"{trace:032x}",
            "span_id": f"{trace:08x}{i:08x}",
            "parent_span_id": None if i == 0 else f"{trace:08x}{0:08x}",
            "name": f"op-{i}",
            "service": service,
            "kind": 1,
            "status_code": 0,
            "start_ns": start + i,
            "end_ns": start + i + 10,
            "attributes": orjson.dumps({"secret.token": f"t{trace}"}).decode(),
            "resource_attributes": "{}",
            "produced_ms": 1,
        }
        for i in range(n)
    ]
    return pa.Table.from_pylist(rows, schema=SPAN_SCHEMA)


def signal(i: int, tenant: str, rule: str = "r1", severity: str = "high") -> dict[str, Any]:
    return {
        "schema_version": 1,
        "signal_id": f"{tenant[:2]}{i:030x}",
        "tenant": tenant,
        "rule_id": rule,
        "rule_version": 1,
        "rule_name": "n",
        "trace_id": f"{i:032x}",
        "span_ids": [],
        "severity": severity,
        "message": "m",
        "detected_at": "2026-11-25T02:47:08.165Z",
        "source_produced_ms": 1,
    }


class Env:
    def __init__(
        self, store: TenantStore, keys: ApiKeyStore, ledger: SignalLedger, server: ApiServer
    ) -> None:
        self.store, self.keys, self.ledger, self.server = store, keys, ledger, server
        self.session = aiohttp.ClientSession()
        self.tokens = {t: keys.create(t)[1] for t in ("acme", "globex")}

    async def get(self, path: str, tenant: str | None = "acme", **params: Any) -> tuple[int, Any, Any]:
        headers = {"Authorization": f"Bearer {self.tokens[tenant]}"} if tenant else {}
        headers.update(params.pop("headers", {}))
        async with self.session.get(self.server.url + path, params=params, headers=headers) as resp:
            return resp.status, orjson.loads(await resp.read()), resp.headers


@pytest_asyncio.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    store = TenantStore(tmp_path / "data")
    keys = ApiKeyStore(tmp_path / "data" / "apikeys.json")
    ledger = SignalLedger(EmbeddedLedger(tmp_path / "data" / "ledger.duckdb"), hooks=InMemoryHooks())
    server = await start_api_server(store, keys, host="127.0.0.1", port=0, ledger=ledger)
    e = Env(store, keys, ledger, server)
    try:
        yield e
    finally:
        await e.session.close()
        await server.stop()
        await ledger.close()
        store.close()


@pytest.mark.asyncio
async def test_openapi_and_auth_errors(env: Env) -> None:
    status, doc, _ = await env.get("/v1/openapi.json", tenant=None)
    assert status == 200
    assert set(doc["paths"]) >= {"/v1/traces/{trace_id}", "/v1/traces", "/v1/signals"}
    status, body, headers = await env.get("/v1/traces", tenant=None)
    assert (status, body["error"]["status"]) == (401, 401)
    assert "Bearer" in headers["WWW-Authenticate"]
    status, _, _ = await env.get(
        "/v1/traces", tenant=None, headers={"Authorization": "Bearer btk_000000000000_x"}
    )
    assert status == 401
    status, body, _ = await env.get("/v1/traces", headers={"X-Scope-OrgID": "globex"})
    assert status == 403
    key_id = env.tokens["acme"].split("_")[1]
    assert env.keys.revoke(key_id, "acme")
    status, body, _ = await env.get("/v1/traces")
    assert status == 401
    assert "revoked" in body["error"]["reason"]


@pytest.mark.asyncio
async def test_trace_by_id_and_bad_parameters(env: Env) -> None:
    env.store.insert_spans("acme", spans(1, "acme", n=3))
    status, trace, _ = await env.get(f"/v1/traces/{1:032x}")
    assert status == 200
    assert trace["span_count"] == 3
    assert [s["name"] for s in trace["spans"]] == ["op-0", "op-1", "op-2"]
    assert (await env.get(f"/v1/traces/{2:032x}"))[0] == 404
    assert (await env.get(f"/v1/traces/{1:032x}", tenant="globex"))[0] == 404
    for path, params in [
        ("/v1/traces/not-hex", {}),
        ("/v1/traces", {"start": "yesterday"}),
        ("/v1/traces", {"start": "2026-11-25T02:47:08"}),
        ("/v1/traces", {"limit": "0"}),
        ("/v1/traces", {"limit": "5000"}),
        ("/v1/traces", {"cursor": "garbage"}),
        ("/v1/traces", {"cursor": "x", "offset": "3"}),
        ("/v1/traces", {"bogus": "1"}),
        ("/v1/traces", {"attribute": "no-equals-sign"}),
        ("/v1/signals", {"severity": "catastrophic"}),
        ("/v1/signals/count", {}),
    ]:
        status, body, _ = await env.get(path, **params)
        assert status == 400, (path, params, body)
        assert body["error"]["reason"]


@pytest.mark.asyncio
async def test_cursor_pages_cover_everything_once_while_writes_continue(env: Env) -> None:
    for t in range(1, 12):
        env.store.insert_spans("acme", spans(t, "acme"))
    seen: list[str] = []
    params: dict[str, Any] = {"limit": "4"}
    extra = iter(range(100, 120))
    while True:
        status, page, _ = await env.get("/v1/traces", **params)
        assert status == 200
        seen.extend(item["trace_id"] for item in page["items"])
        env.store.insert_spans("acme", spans(next(extra), "acme"))
        if not page["next_cursor"]:
            break
        params = {"limit": "4", "cursor": page["next_cursor"]}
    assert len(seen) == len(set(seen))
    assert {int(t, 16) for t in seen} >= set(range(1, 12))
    _, first, _ = await env.get("/v1/traces", limit="2")
    status, body, _ = await env.get("/v1/traces", limit="2", cursor=first["next_cursor"], service="api")
    assert status == 400
    assert "other filters" in body["error"]["reason"]
    status, offset_page, _ = await env.get("/v1/traces", limit="3", offset="2")
    assert [i["trace_id"] for i in offset_page["items"]] == seen[2:5]


@pytest.mark.asyncio
async def test_signals_list_and_ledger_counts(env: Env) -> None:
    docs = [
        signal(i, "acme", rule="r1" if i % 2 else "r2", severity="high" if i < 4 else "low") for i in range(8)
    ]
    env.store.insert_signals("acme", docs)
    await env.ledger.record(docs)
    await env.ledger.record(docs)  # a replay: the counters must not move
    status, page, _ = await env.get("/v1/signals", rule="r1", severity="high")
    assert status == 200
    assert [int(i["trace_id"], 16) for i in page["items"]] == [1, 3]
    status, count, _ = await env.get("/v1/signals/count", rule="r1")
    assert (status, count["total"], count["versions"]) == (200, 4, [{"version": 1, "signals": 4}])
    status, other, _ = await env.get("/v1/signals/count", tenant="globex", rule="r1")
    assert (status, other["total"]) == (200, 0)
    assert (await env.get("/v1/signals", tenant="globex"))[1]["items"] == []


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(owners=st.lists(st.sampled_from(["acme", "globex"]), min_size=1, max_size=12))
def test_a_key_only_ever_reads_its_own_tenant(
    tmp_path_factory: pytest.TempPathFactory, owners: list[str]
) -> None:
    import asyncio

    async def run() -> None:
        tmp = tmp_path_factory.mktemp("iso")
        store = TenantStore(tmp / "data")
        keys = ApiKeyStore(tmp / "keys.json")
        server = await start_api_server(store, keys, port=0)
        env = Env(store, keys, None, server)  # type: ignore[arg-type]
        try:
            for trace, owner in enumerate(owners, start=1):
                store.insert_spans(owner, spans(trace, owner))
                store.insert_signals(owner, [signal(trace, owner)])
            for tenant in ("acme", "globex"):
                mine = {t for t, o in enumerate(owners, start=1) if o == tenant}
                _, page, _ = await env.get("/v1/traces", tenant=tenant, limit="1000")
                assert {int(i["trace_id"], 16) for i in page["items"]} == mine
                _, sigs, _ = await env.get("/v1/signals", tenant=tenant, limit="1000")
                assert {int(i["trace_id"], 16) for i in sigs["items"]} == mine
                for trace in range(1, len(owners) + 1):
                    status, _, _ = await env.get(f"/v1/traces/{trace:032x}", tenant=tenant)
                    assert status == (200 if trace in mine else 404)
        finally:
            await env.session.close()
            await server.stop()
            store.close()

    asyncio.run(run())


HOLDER = """
import sys, time, duckdb
con = duckdb.connect(sys.argv[1])
print("held", flush=True)
time.sleep(60)
"""


@pytest.mark.asyncio
async def test_read_only_server_answers_503_while_a_worker_holds_the_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    writer = TenantStore(data)
    writer.insert_spans("acme", spans(1, "acme"))
    writer.close()
    keys = ApiKeyStore(tmp_path / "keys.json")
    token = keys.create("acme")[1]
    server = await start_api_server(ReadOnlyStore(data), keys, port=0)
    headers = {"Authorization": f"Bearer {token}"}
    try:
        async with aiohttp.ClientSession(headers=headers) as session:
            async with session.get(f"{server.url}/v1/traces/{1:032x}") as resp:
                assert resp.status == 200
            holder = subprocess.Popen(  # noqa: ASYNC220 - a second process must hold the file
                [sys.executable, "-c", HOLDER, str(data / "tenant=acme.duckdb")],
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert holder.stdout is not None
                assert holder.stdout.readline().strip() == "held"
                async with session.get(f"{server.url}/v1/traces/{1:032x}") as resp:
                    body = orjson.loads(await resp.read())
                    assert resp.status == 503
                    assert resp.headers["Retry-After"] == "1"
                    assert "worker" in body["error"]["reason"]
            finally:
                holder.kill()
                holder.wait()
                if holder.stdout is not None:
                    holder.stdout.close()
            async with session.get(f"{server.url}/v1/traces/{1:032x}") as resp:
                assert resp.status == 200
    finally:
        await server.stop()
