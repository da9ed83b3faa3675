"""Hot-store tables and queries on real DuckDB files: summaries, queries, retention, keys, cursors."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pytest

from betrace.api import cursor as cursors
from betrace.api import queries
from betrace.api.keys import ApiKeyStore, AuthError
from betrace.sinks.duckdb_store import TenantStore
from betrace.streams.schemas import SPAN_SCHEMA

DAY_NS = 86_400 * 10**9


def spans(
    trace: int, n: int, *, tenant: str = "acme", start_ns: int = 0, service: str = "api", **attrs: Any
) -> pa.Table:
    start = start_ns or time.time_ns()
    rows = [
        {
            "tenant": tenant,
            "trace_id": f"{trace:032x}",
            "span_id": f"{trace:08x}{i:08x}",
            "parent_span_id": None if i == 0 else f"{trace:08x}{0:08x}",
            "name": "root" if i == 0 else f"child-{i}",
            "service": service if i == 0 else f"{service}-{i % 2}",
            "kind": 1,
            "status_code": 2 if i == n - 1 else 0,
            "start_ns": start + i * 1000,
            "end_ns": start + i * 1000 + 500,
            "attributes": orjson.dumps({"i": i, **attrs}).decode(),
            "resource_attributes": "{}",
            "produced_ms": 1,
        }
        for i in range(n)
    ]
    return pa.Table.from_pylist(rows, schema=SPAN_SCHEMA)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TenantStore]:
    s = TenantStore(tmp_path / "data")
    yield s
    s.close()


def test_summaries_count_each_span_once_across_batches_and_replays(store: TenantStore) -> None:
    full = spans(1, 6)
    assert store.insert_spans("acme", full.slice(2, 4)) == 4  # children first, as exporters often do
    assert store.insert_spans("acme", full) == 2  # the rest, with a replay of the first four
    assert store.insert_spans("acme", full) == 0
    with store.cursor("acme") as con:
        trace = queries.get_trace(con, f"{1:032x}")
    assert trace is not None
    assert (trace["span_count"], trace["error_count"], trace["root_name"], trace["root_service"]) == (
        6,
        1,
        "root",
        "api",
    )
    assert trace["services"] == ["api", "api-0", "api-1"]
    assert [s["span_id"] for s in trace["spans"]] == sorted(s["span_id"] for s in trace["spans"])
    assert trace["spans"][0]["attributes"] == {"i": 0}
    store.compact_summaries("acme")
    with store.cursor("acme") as con:
        again = queries.get_trace(con, f"{1:032x}")
        parts = con.execute("SELECT count(*) FROM trace_summaries").fetchone()
    assert again == trace
    assert parts == (1,)


def test_queries_by_time_service_and_attribute(store: TenantStore) -> None:
    base = time.time_ns()
    store.insert_spans("acme", spans(1, 3, start_ns=base, service="checkout", **{"user.id": "u1"}))
    store.insert_spans("acme", spans(2, 3, start_ns=base + 10**9, service="profile"))
    store.insert_spans(
        "acme", spans(3, 3, start_ns=base + 2 * 10**9, service="checkout", **{"user.id": "u2"})
    )
    with store.cursor("acme") as con:

        def ids(**kw: Any) -> list[int]:
            return [int(r["trace_id"], 16) for r in queries.list_traces(con, **kw).items]

        assert ids() == [1, 2, 3]
        assert ids(start_ns=base + 10**9) == [2, 3]
        assert ids(end_ns=base + 10**9) == [1]
        assert ids(service="checkout") == [1, 3]
        assert ids(service="checkout-1") == [1, 3]
        assert ids(attribute=("user.id", "u2")) == [3]
        assert ids(attribute=("i", "2")) == [1, 2, 3]
        hits = queries.spans_with_attribute(con, "user.id", "u1")
        assert {h["trace_id"] for h in hits} == {f"{1:032x}"}


def test_keyset_pages_neither_repeat_nor_skip_while_writes_continue(store: TenantStore) -> None:
    for t in range(1, 8):
        store.insert_spans("acme", spans(t, 2))
    seen: list[str] = []
    page = queries.Page(limit=3)
    writes = iter(range(100, 110))
    while True:
        with store.cursor("acme") as con:
            result = queries.list_traces(con, page=page)
        seen.extend(r["trace_id"] for r in result.items)
        store.insert_spans("acme", spans(next(writes), 2))  # a new trace arrives between pages
        store.insert_spans("acme", spans(1, 4))  # and a late span of an old trace
        if result.next_key is None:
            break
        page = queries.Page(limit=3, after=result.next_key)
    assert len(seen) == len(set(seen))
    assert {int(t, 16) for t in seen} >= set(range(1, 8))


def test_retention_never_deletes_unarchived_data(
    store: TenantStore, caplog: pytest.LogCaptureFixture
) -> None:
    now = time.time_ns()
    store.insert_spans("acme", spans(1, 2, start_ns=now - 9 * DAY_NS))
    store.insert_spans("acme", spans(2, 2, start_ns=now - 8 * DAY_NS))
    store.insert_spans("acme", spans(3, 2, start_ns=now - DAY_NS))
    result = store.apply_retention("acme", now_ns=now)
    assert (result.deleted_traces, result.awaiting_archive) == (0, 2)
    assert "not archived" in caplog.text

    class ArchivedUntil:
        def archived_until_ns(self, tenant: str) -> int | None:
            return now - int(8.5 * DAY_NS)

    result = store.apply_retention("acme", archive=ArchivedUntil(), now_ns=now)
    assert (result.deleted_traces, result.deleted_spans, result.awaiting_archive) == (1, 2, 1)
    with store.cursor("acme") as con:
        assert [int(r["trace_id"], 16) for r in queries.list_traces(con).items] == [2, 3]
        assert con.execute("SELECT count(*) FROM spans").fetchone() == (4,)
    short = store.apply_retention("acme", retention_s=3600, archive=ArchivedUntil(), now_ns=now)
    assert short.deleted_traces == 0  # trace 3 is past one hour but not archived


def test_signals_by_rule_time_and_severity(store: TenantStore) -> None:
    docs = [
        {
            "signal_id": f"{i:032x}",
            "tenant": "acme",
            "rule_id": "r1" if i % 2 else "r2",
            "rule_version": 1,
            "rule_name": "n",
            "trace_id": f"{i:032x}",
            "span_ids": [],
            "severity": "high" if i < 3 else "low",
            "message": "m",
            "detected_at": f"2026-11-25T02:47:0{i}.000Z",
            "source_produced_ms": 1,
        }
        for i in range(6)
    ]
    store.insert_signals("acme", docs)
    with store.cursor("acme") as con:

        def ids(**kw: Any) -> list[int]:
            return [int(r["signal_id"], 16) for r in queries.list_signals(con, **kw).items]

        assert ids() == [0, 1, 2, 3, 4, 5]
        assert ids(rule="r1") == [1, 3, 5]
        assert ids(severities=("high",)) == [0, 1, 2]
        start = 1_795_574_828 * 10**9  # 2026-11-25T02:47:08Z
        assert ids(start_ns=start - 6 * 10**9, end_ns=start - 4 * 10**9) == [2, 3]
        first = queries.list_signals(con, page=queries.Page(limit=4))
        assert first.next_key is not None
        assert first.items[0]["detected_at"] == "2026-11-25T02:47:00.000Z"
        rest = queries.list_signals(con, page=queries.Page(limit=4, after=first.next_key))
        assert [int(r["signal_id"], 16) for r in rest.items] == [4, 5]
        assert rest.next_key is None


def test_cursor_round_trip_and_rejections() -> None:
    filters = {"rule": "r1", "start": None}
    token = cursors.encode((123, "abc"), filters)
    assert cursors.decode(token, filters) == (123, "abc")
    with pytest.raises(cursors.CursorError, match="other filters"):
        cursors.decode(token, {"rule": "r2", "start": None})
    for junk in ("", "!!!", "eyJ2IjoyfQ", token[:-3]):
        with pytest.raises(cursors.CursorError):
            cursors.decode(junk, filters)


def test_api_keys_are_hashed_and_revocable(tmp_path: Path) -> None:
    keys = ApiKeyStore(tmp_path / "keys.json")
    key, token = keys.create("acme", "ci")
    assert keys.authenticate(token).tenant == "acme"
    raw = (tmp_path / "keys.json").read_text()
    assert token.split("_", 2)[2] not in raw  # the whole secret: it may hold "_" itself
    assert oct((tmp_path / "keys.json").stat().st_mode & 0o777) == "0o600"
    other = ApiKeyStore(tmp_path / "keys.json")  # e.g. the CLI in another process
    assert [k.key_id for k in other.list("acme")] == [key.key_id]
    assert other.revoke(key.key_id, "acme")
    assert not other.revoke(key.key_id, "acme")
    with pytest.raises(AuthError, match="revoked"):
        keys.authenticate(token)
    for bad in (None, "", "btk_nope", token[:-1] + ("A" if token[-1] != "A" else "B")):
        with pytest.raises(AuthError):
            keys.authenticate(bad)
