"""GET /v1/audit/* over real HTTP, on a trail that concurrent writer processes keep extending."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import duckdb
import orjson
import pytest
import pytest_asyncio

from betrace.api.http import ApiServer, ReadOnlyStore, start_api_server
from betrace.api.keys import ApiKeyStore
from betrace.audit.events import AuditEventType
from betrace.audit.recorder import DuckDBAuditRecorder

T = AuditEventType

WRITER = """
import sys, time
from pathlib import Path
from betrace.audit.recorder import DuckDBAuditRecorder
from betrace.audit.events import AuditEventType as T
path, name, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
with DuckDBAuditRecorder(path, flush_events=13, flush_interval_s=0.05) as rec:
    root = rec.record(T.INGESTION_RUN_STARTED, actor=name, subject="run", tenant="acme")
    for i in range(n):
        rec.record(T.INGESTION_BATCH, actor=name, subject=f"{name}-{i}", tenant="acme", parent=root)
        if i % 50 == 0:
            time.sleep(0.02)
"""


def start_writers(path: Path, count: int, events: int) -> list[subprocess.Popen[bytes]]:
    return [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), f"w{n}", str(events)])
        for n in range(count)
    ]


class Client:
    def __init__(self, server: ApiServer, keys: ApiKeyStore) -> None:
        self.server = server
        self.session = aiohttp.ClientSession()
        self.tokens = {t: keys.create(t)[1] for t in ("acme", "globex")}

    async def get(self, path: str, as_tenant: str = "acme", **params: Any) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.tokens[as_tenant]}"}
        async with self.session.get(self.server.url + path, params=params, headers=headers) as resp:
            return resp.status, orjson.loads(await resp.read())


@pytest_asyncio.fixture
async def client(tmp_path: Path) -> AsyncIterator[Client]:
    data = tmp_path / "data"
    data.mkdir()
    keys = ApiKeyStore(data / "apikeys.json")
    server = await start_api_server(ReadOnlyStore(data), keys, port=0)
    c = Client(server, keys)
    try:
        yield c
    finally:
        await c.session.close()
        await server.stop()


@pytest.mark.asyncio
async def test_tenant_visibility_chain_children_and_errors(client: Client, tmp_path: Path) -> None:
    path = tmp_path / "data" / "audit.duckdb"
    status, body = await client.get("/v1/audit/events")
    assert (status, body["items"]) == (200, [])  # no trail yet
    with DuckDBAuditRecorder(path) as rec:
        worker = rec.record(T.WORKER_STARTED, actor="w", subject="worker")  # a system event
        batch = rec.record(T.EVALUATION_BATCH, actor="w", subject="b", tenant="acme", parent=worker)
        signals = [
            rec.record(T.SIGNAL_EMITTED, actor="w", subject=f"s{i}", tenant="acme", parent=batch)
            for i in range(3)
        ]
        other = rec.record(T.EVALUATION_BATCH, actor="w", subject="g", tenant="globex", parent=worker)
    status, body = await client.get("/v1/audit/events")
    assert status == 200
    assert [d["subject"] for d in body["items"]] == ["b", "s0", "s1", "s2"]
    status, body = await client.get("/v1/audit/events", type="signal.emitted", limit="2")
    assert [d["subject"] for d in body["items"]] == ["s0", "s1"]
    status, body = await client.get(
        "/v1/audit/events", type="signal.emitted", limit="2", cursor=body["next_cursor"]
    )
    assert ([d["subject"] for d in body["items"]], body["next_cursor"]) == (["s2"], None)
    # A cursor is bound to its filters.
    status, body = await client.get("/v1/audit/events", type="evaluation.batch", cursor=body["resume_cursor"])
    assert status == 400
    # System events and other tenants' events are invisible: a 404 like an unknown id.
    assert (await client.get(f"/v1/audit/events/{worker.event_id}"))[0] == 404
    assert (await client.get(f"/v1/audit/events/{other.event_id}"))[0] == 404
    assert (await client.get(f"/v1/audit/events/{other.event_id}", as_tenant="globex"))[0] == 200
    status, body = await client.get(f"/v1/audit/events/{signals[1].event_id}/chain")
    assert status == 200
    assert [d["event_id"] for d in body["ancestors"]] == [batch.event_id]
    assert body["hidden"] == 1  # worker.started: walked through, not shown
    status, body = await client.get(f"/v1/audit/events/{batch.event_id}/children", limit="2")
    assert [d["subject"] for d in body["items"]] == ["s0", "s1"]
    status, body = await client.get(
        f"/v1/audit/events/{batch.event_id}/children", limit="2", cursor=body["next_cursor"]
    )
    assert [d["subject"] for d in body["items"]] == ["s2"]
    for bad in ({"type": "nope"}, {"since": "yesterday"}, {"limit": "0"}, {"cursor": "garbage"}):
        status, body = await client.get("/v1/audit/events", **bad)
        assert status == 400, bad
        assert body["error"]["reason"]
    assert (await client.get("/v1/audit/events", tenant="globex"))[0] == 403
    assert (await client.get("/v1/audit/events/bad id!"))[0] == 400


@pytest.mark.asyncio
async def test_paging_while_three_processes_write_never_misses_or_repeats(
    client: Client, tmp_path: Path
) -> None:
    path = tmp_path / "data" / "audit.duckdb"
    per_writer = 400
    writers = start_writers(path, 3, per_writer)
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            params = {"limit": "37", **({"cursor": cursor} if cursor else {})}
            status, body = await client.get("/v1/audit/events", **params)
            if status == 503:  # a writer held the file past the read timeout: retry
                continue
            assert status == 200, body
            seen += [d["event_id"] for d in body["items"]]
            pages += 1
            cursor = body["resume_cursor"] or cursor
            if body["next_cursor"] is None and all(w.poll() is not None for w in writers):
                status, body = await client.get("/v1/audit/events", limit="37", cursor=cursor)
                seen += [d["event_id"] for d in body["items"]]
                if not body["items"]:
                    break
    finally:
        codes = [w.wait(60) for w in writers]
    assert codes == [0, 0, 0]
    con = duckdb.connect(str(path), read_only=True)
    everything = [r[0] for r in con.execute("SELECT event_id FROM audit_events").fetchall()]
    con.close()
    assert len(everything) == 3 * (per_writer + 1)
    assert len(seen) == len(set(seen)), "an event was served twice"
    assert set(seen) == set(everything), "an event was never served"
    assert pages > 10  # the paging really interleaved with the writes
