"""The worker's query API with tenant ownership: owned tenants live, others read-only or 503."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from tests.integration.api.test_api_http import spans

from betrace.api.http import start_api_server
from betrace.api.keys import ApiKeyStore
from betrace.sinks.duckdb_store import TenantStore
from betrace.streams.topics import tenant_partition

HOLDER = (
    "import duckdb, sys, time\ncon = duckdb.connect(sys.argv[1])\nprint('held', flush=True)\ntime.sleep(60)\n"
)


@pytest.mark.asyncio
async def test_worker_api_reads_owned_tenants_and_names_the_owner_of_others(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert (tenant_partition("acme", 4), tenant_partition("initech", 4)) == (1, 2)
    other_worker = TenantStore(data)
    other_worker.insert_spans("initech", spans(2, "initech"))
    other_worker.close()
    store = TenantStore(data)
    store.track_ownership(4)
    store.assign({1})  # this worker owns acme, another one owns initech
    store.insert_spans("acme", spans(1, "acme"))
    keys = ApiKeyStore(tmp_path / "keys.json")
    tokens = {t: keys.create(t)[1] for t in ("acme", "initech")}
    server = await start_api_server(store, keys, port=0)
    try:
        async with aiohttp.ClientSession() as session:

            async def get(tenant: str, trace: int) -> tuple[int, dict[str, str], bytes]:
                headers = {"Authorization": f"Bearer {tokens[tenant]}"}
                async with session.get(f"{server.url}/v1/traces/{trace:032x}", headers=headers) as resp:
                    return resp.status, dict(resp.headers), await resp.read()

            assert (await get("acme", 1))[0] == 200  # through this worker's own connection
            assert (await get("initech", 2))[0] == 200  # nobody holds it: read-only
            holder = subprocess.Popen(  # noqa: ASYNC220 - the owning worker, in another process
                [sys.executable, "-c", HOLDER, str(data / "tenant=initech.duckdb")],
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert holder.stdout is not None
                assert holder.stdout.readline().strip() == "held"
                status, headers, body = await get("initech", 2)
                assert status == 503
                assert headers["Retry-After"] == "1"
                assert b"owned by another worker" in body
                assert b"partition 2" in body
                assert (await get("acme", 1))[0] == 200
            finally:
                holder.kill()
                holder.wait()
                if holder.stdout is not None:
                    holder.stdout.close()
    finally:
        await server.stop()
        store.close()
