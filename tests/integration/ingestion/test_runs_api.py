"""GET /v1/runs and /v1/runs/{id} over real HTTP, on a real runs.duckdb."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from betrace.api.http import ReadOnlyStore, start_api_server
from betrace.api.keys import ApiKeyStore
from betrace.ingestion.runs import IngestionRun


async def _session(data_dir: Path, calls: list[tuple[str, dict[str, str], str | None]]) -> list[Any]:
    keys = ApiKeyStore(data_dir / "keys.json")
    _, token = keys.create("acme")
    server = await start_api_server(ReadOnlyStore(data_dir), keys)
    out = []
    try:
        async with aiohttp.ClientSession() as session:
            for path, params, auth in calls:
                headers = {"Authorization": f"Bearer {token if auth == 'key' else auth}"} if auth else {}
                async with session.get(server.url + path, params=params, headers=headers) as resp:
                    out.append((resp.status, orjson.loads(await resp.read())))
    finally:
        await server.stop()
    return out


def test_runs_api_pages_filters_and_refuses_bad_input(tmp_path: Path) -> None:
    ids = []
    for i in range(5):
        run = IngestionRun(tmp_path, "import" if i % 2 else "worker", f"s{i}")
        run.start()
        run.counts.spans = i
        if i < 4:
            run.finish()
        ids.append(run.run_id)
    calls: list[tuple[str, dict[str, str], str | None]] = [
        ("/v1/runs", {"limit": "2"}, "key"),
        ("/v1/runs", {"kind": "import"}, "key"),
        ("/v1/runs", {"state": "running"}, "key"),
        (f"/v1/runs/{ids[3]}", {}, "key"),
        ("/v1/runs/nope", {}, "key"),
        ("/v1/runs", {"kind": "bogus"}, "key"),
        ("/v1/runs", {}, None),
        ("/v1/runs", {"unknown": "1"}, "key"),
    ]
    first, imports, running, one, missing, bad, anonymous, unknown = asyncio.run(_session(tmp_path, calls))
    assert first[0] == 200 and [r["run_id"] for r in first[1]["items"]] == ids[::-1][:2]
    assert first[1]["next_cursor"]
    assert imports[0] == 200 and {r["run_id"] for r in imports[1]["items"]} == {ids[1], ids[3]}
    assert [r["run_id"] for r in running[1]["items"]] == [ids[4]]
    assert one == (200, one[1]) and one[1]["spans"] == 3 and one[1]["state"] == "finished"
    assert missing[0] == 404
    assert bad[0] == 400 and "kind" in bad[1]["error"]["reason"]
    assert anonymous[0] == 401
    assert unknown[0] == 400

    # Following next_cursor visits every run exactly once.
    seen: list[str] = []
    cursor = None
    for _ in range(5):
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        ((status, page),) = asyncio.run(_session(tmp_path, [("/v1/runs", params, "key")]))
        assert status == 200
        seen += [r["run_id"] for r in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == ids[::-1]
