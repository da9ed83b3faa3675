"""Integrity checks on real DuckDB files: each anomaly kind, deterministic ids, resolution."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from betrace.integrity.checks import anomaly_id
from betrace.integrity.sink import IntegritySink
from betrace.integrity.store import check_closed, check_stored, count_by_kind, list_anomalies
from betrace.metrics import InMemoryHooks
from betrace.sinks.duckdb_store import TenantStore
from betrace.streams.schemas import SPAN_SCHEMA

T1, T2 = "a" * 32, "b" * 32
MS = 1_000_000
SKEW_NS = 100 * MS


def span(
    trace: str, span_id: str, parent: str | None, start_ms: int, name: str = "op", **extra: Any
) -> dict[str, Any]:
    return {
        "tenant": "acme",
        "trace_id": trace,
        "span_id": span_id.ljust(16, "0"),
        "parent_span_id": parent.ljust(16, "0") if parent else None,
        "name": name,
        "service": "svc",
        "kind": 1,
        "status_code": extra.get("status_code", 0),
        "start_ns": 1_700_000_000_000 * MS + start_ms * MS,
        "end_ns": 1_700_000_000_000 * MS + start_ms * MS + extra.get("duration_ms", 10) * MS,
        "attributes": "{}",
        "resource_attributes": "{}",
        "produced_ms": 0,
    }


def table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=SPAN_SCHEMA)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TenantStore]:
    store = TenantStore(tmp_path / "data")
    yield store
    store.close()


def kinds(store: TenantStore, state: str | None = None) -> list[tuple[str, str, str]]:
    with store.cursor("acme") as con:
        items = list_anomalies(con, state=state).items
    return sorted((i["kind"], i["trace_id"], i["span_id"]) for i in items)


# T1: root r, child c1 fine, c2 starts 500 ms before its parent c1, o1 has a parent that never came.
# T2: no root (its only span's parent is in T1), plus a conflicting duplicate of span d.
BROKEN = [
    span(T1, "01", None, 0),
    span(T1, "02", "01", 1000),
    span(T1, "03", "02", 500),
    span(T1, "04", "ff", 20),
    span(T2, "05", "02", 5),
    span(T2, "06", "05", 10),
    span(T2, "06", "05", 11, name="other"),
]


def test_close_check_flags_every_kind_once(store: TenantStore) -> None:
    with store.cursor("acme") as con:
        outcome = check_closed(con, "acme", table(BROKEN), SKEW_NS)
    assert dict(outcome.opened) == {
        "child_before_parent": 1,
        "orphan_span": 1,
        "parent_in_other_trace": 1,
        "missing_root": 1,
        "conflicting_duplicate": 1,
    }
    assert kinds(store) == sorted(
        [
            ("child_before_parent", T1, "03".ljust(16, "0")),
            ("orphan_span", T1, "04".ljust(16, "0")),
            ("parent_in_other_trace", T2, "05".ljust(16, "0")),
            ("missing_root", T2, ""),
            ("conflicting_duplicate", T2, "06".ljust(16, "0")),
        ]
    )
    with store.cursor("acme") as con:
        items = list_anomalies(con).items
    skew = next(i for i in items if i["kind"] == "child_before_parent")
    assert skew["details"] == {
        "parent_span_id": "02".ljust(16, "0"),
        "early_by_ms": 500.0,
        "allowance_ms": 100.0,
    }
    assert skew["anomaly_id"] == anomaly_id("acme", "child_before_parent", T1, "03".ljust(16, "0"))
    assert {i["state"] for i in items} == {"open"}
    # The same traces again (a replay): the same ids, nothing doubles, nothing newly opened.
    with store.cursor("acme") as con:
        again = check_closed(con, "acme", table(BROKEN), SKEW_NS)
        assert sum(count_by_kind(con).values()) == 5
    assert not again.opened
    assert sum(again.found.values()) == 5


def test_skew_within_the_allowance_is_not_flagged(store: TenantStore) -> None:
    rows = [span(T1, "01", None, 1000), span(T1, "02", "01", 950)]  # 50 ms early, allowance 100 ms
    with store.cursor("acme") as con:
        assert not check_closed(con, "acme", table(rows), SKEW_NS).found
        assert check_closed(con, "acme", table(rows), 10 * MS).found == {"child_before_parent": 1}


def test_clean_traces_have_no_anomalies(store: TenantStore) -> None:
    rows = [span(T1, "01", None, 0), span(T1, "02", "01", 1), span(T1, "03", "02", 2)]
    with store.cursor("acme") as con:
        outcome = check_closed(con, "acme", table(rows), SKEW_NS)
    assert not outcome.found
    assert kinds(store) == []


def test_recheck_resolves_when_the_missing_parent_arrives(store: TenantStore) -> None:
    first = [span(T1, "01", None, 0), span(T1, "02", "01", 5), span(T1, "04", "0f", 20)]
    store.upsert_spans("acme", table(first))
    with store.cursor("acme") as con:
        outcome = check_stored(con, "acme", since_ns=None, skew_ns=SKEW_NS)
    assert dict(outcome.opened) == {"orphan_span": 1}
    assert outcome.traces == 1
    # The late parent arrives; a recheck resolves the orphan, keeping its row and id.
    store.upsert_spans("acme", table([span(T1, "0f", "01", 10)]))
    with store.cursor("acme") as con:
        outcome = check_stored(con, "acme", since_ns=None, skew_ns=SKEW_NS)
        assert dict(outcome.resolved) == {"orphan_span": 1}
        assert not outcome.opened
        assert count_by_kind(con) == {("orphan_span", "resolved"): 1}
        resolved = list_anomalies(con, state="resolved").items
    assert resolved[0]["resolved_at"] is not None
    assert kinds(store, "open") == []


def test_recheck_sees_parents_in_other_stored_traces(store: TenantStore) -> None:
    store.upsert_spans("acme", table([span(T1, "01", None, 0), span(T2, "05", "01", 5)]))
    with store.cursor("acme") as con:
        outcome = check_stored(con, "acme", since_ns=None, skew_ns=SKEW_NS)
    assert dict(outcome.opened) == {"parent_in_other_trace": 1, "missing_root": 1}


def test_since_limits_the_recheck_to_recent_traces(store: TenantStore) -> None:
    store.upsert_spans("acme", table([span(T1, "04", "0f", 0)]))
    with store.cursor("acme") as con:
        later = 1_700_000_000_000 * MS + 3_600_000 * MS
        assert check_stored(con, "acme", since_ns=later, skew_ns=SKEW_NS).traces == 0
        assert check_stored(con, "acme", since_ns=None, skew_ns=SKEW_NS).traces == 1


def test_the_close_sink_checks_many_tenants_in_one_query_as_each_alone(store: TenantStore) -> None:
    """Keys include the tenant: another tenant's span is never a parent, nor a duplicate."""
    t3 = "c" * 32
    acme = [{**r, "tenant": "acme"} for r in BROKEN]
    zeta = [{**r, "tenant": "zeta"} for r in BROKEN] + [{**span(t3, "ff", None, 0), "tenant": "zeta"}]
    sink = IntegritySink(store, skew_ms=SKEW_NS / MS, max_spans=1_000, hooks=InMemoryHooks())
    assert sink.offer(table(acme + zeta))
    asyncio.run(sink.flush())
    assert kinds(store) == sorted(
        [
            ("child_before_parent", T1, "03".ljust(16, "0")),
            ("orphan_span", T1, "04".ljust(16, "0")),  # "ff" is only zeta's
            ("parent_in_other_trace", T2, "05".ljust(16, "0")),
            ("missing_root", T2, ""),
            ("conflicting_duplicate", T2, "06".ljust(16, "0")),
        ]
    )
    with store.cursor("zeta") as con:
        zeta_kinds = sorted((i["kind"], i["trace_id"]) for i in list_anomalies(con).items)
    assert ("parent_in_other_trace", T1) in zeta_kinds and ("orphan_span", T1) not in zeta_kinds
    assert len(zeta_kinds) == 5
    # A clean batch writes nothing, not even the table, to the tenant's file.
    assert sink.offer(table([{**span(t3, "01", None, 0), "tenant": "clean"}]))
    asyncio.run(sink.flush())
    with store.cursor("clean") as con:
        assert list_anomalies(con).items == []
