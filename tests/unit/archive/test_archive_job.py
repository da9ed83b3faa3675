"""The archival job over real DuckDB files and a real cold directory."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq
import pytest
from tests.conftest import MotoS3, refuse_writes
from tests.unit.archive.conftest import DAYS, SIGNALS_PER_DAY, SPANS_PER_DAY, TODAY, make_job

from betrace.api import queries
from betrace.archive import state
from betrace.archive.coldread import HOT, ColdCatalog, Tables
from betrace.archive.layout import Manifest, manifest_key
from betrace.archive.storage import StateArchiveStatus
from betrace.audit.events import AuditEventType, EventRef
from betrace.sinks.cold import ColdStorage, FilesystemColdStorage
from betrace.sinks.duckdb_store import TenantStore


def counts(store: TenantStore) -> tuple[int, int]:
    with store.cursor("acme") as con:
        row = con.execute("SELECT (SELECT count(*) FROM spans), (SELECT count(*) FROM signals)").fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def everything(store: TenantStore, cold: ColdStorage | None) -> dict[str, Any]:
    """Every query the API offers, paged to the end with cursors."""
    with store.cursor("acme") as con:
        tables: Tables = ColdCatalog(cold).attach(con) if cold else HOT
        traces, page = [], queries.Page(limit=250)
        while True:
            res = queries.list_traces(con, page=page, tables=tables)
            traces += res.items
            if res.next_key is None:
                break
            page = queries.Page(limit=250, after=res.next_key)
        signals = queries.list_signals(con, page=queries.Page(limit=1000), tables=tables).items
        ids = [t["trace_id"] for t in traces[::37]]
        return {
            "traces": traces,
            "by_id": [queries.get_trace(con, i, tables=tables) for i in ids],
            "db": queries.list_traces(con, service="db", page=queries.Page(limit=1000), tables=tables).items,
            "window": queries.list_traces(
                con,
                start_ns=traces[100]["start_ns"],
                end_ns=traces[-100]["start_ns"],
                page=queries.Page(limit=1000),
                tables=tables,
            ).items,
            "attr": queries.list_traces(
                con, attribute=("user.id", "u7"), page=queries.Page(limit=1000), tables=tables
            ).items,
            "spans_attr": queries.spans_with_attribute(
                con, "http.status_code", "500", limit=500, tables=tables
            ),
            "signals": signals,
            "high": queries.list_signals(
                con, severities=("high",), rule="pii-audit", page=queries.Page(limit=1000), tables=tables
            ).items,
        }


def test_results_are_identical_before_and_after_archiving(
    store: TenantStore, cold: FilesystemColdStorage
) -> None:
    before = everything(store, None)
    assert len(before["traces"]) == 3 * SPANS_PER_DAY // 10 and before["attr"] and before["spans_attr"]
    report = asyncio.run(make_job(store, cold).run())
    assert [(u.day, u.kind, u.state) for u in report.units] == [
        (d, k, "cleaned") for d in DAYS for k in ("spans", "signals")
    ]
    assert counts(store) == (0, 0)  # everything is cold now
    assert everything(store, cold) == before


def test_half_archived_tenant_reads_both_tiers(store: TenantStore, cold: FilesystemColdStorage) -> None:
    before = everything(store, None)
    asyncio.run(make_job(store, cold).run(day=DAYS[1]))
    assert counts(store) == (2 * SPANS_PER_DAY, 2 * SIGNALS_PER_DAY)
    assert everything(store, cold) == before


def test_files_layout_manifest_and_sorting(store: TenantStore, cold: FilesystemColdStorage) -> None:
    asyncio.run(make_job(store, cold).run(day=DAYS[0]))
    day = DAYS[0]
    keys = [s.key for s in cold.list(f"acme/{day:%Y/%m/%d}")]
    assert keys == [
        f"acme/{day:%Y/%m/%d}/{name}"
        for name in ("manifest.json", "signals-0000.parquet", "spans-0000.parquet", "traces-0000.parquet")
    ]
    manifest = Manifest.from_json(cold.get(manifest_key("acme", day)))
    assert {f.key.rpartition("/")[2]: f.rows for f in manifest.files} == {
        "signals-0000.parquet": SIGNALS_PER_DAY,
        "spans-0000.parquet": SPANS_PER_DAY,
        "traces-0000.parquet": SPANS_PER_DAY // 10,
    }
    for f in manifest.files:
        assert cold.stat(f.key).sha256 == f.sha256
    spans = cold.root / f"acme/{day:%Y/%m/%d}/spans-0000.parquet"
    meta = pq.read_metadata(spans)
    assert meta.row_group(0).column(0).compression == "ZSTD"
    ids = pq.read_table(spans, columns=["trace_id"]).column(0).to_pylist()
    assert ids == sorted(ids)


def test_rerun_does_nothing_and_duplicates_nothing(store: TenantStore, cold: FilesystemColdStorage) -> None:
    job = make_job(store, cold)
    asyncio.run(job.run())
    again = asyncio.run(job.run())
    assert again.units == []
    with store.cursor("acme") as con:
        spans = con.execute(
            "SELECT count(*), count(DISTINCT (trace_id, span_id)) FROM read_parquet($p)",
            {"p": [str(cold.root / k) for k in ColdCatalog(cold).files(con)["spans"]]},
        ).fetchone()
    assert spans == (3 * SPANS_PER_DAY, 3 * SPANS_PER_DAY)


def test_late_spans_for_an_archived_day_become_the_next_part(
    store: TenantStore, cold: FilesystemColdStorage
) -> None:
    job = make_job(store, cold)
    asyncio.run(job.run(day=DAYS[0]))
    with store.cursor("acme") as con:
        trace_id, start = con.execute(  # type: ignore[misc]
            "SELECT trace_id, start_ns FROM _cold LIMIT 1".replace(
                "_cold", f"read_parquet('{cold.root}/acme/{DAYS[0]:%Y/%m/%d}/spans-0000.parquet')"
            )
        ).fetchone()
    late = {
        "tenant": "acme",
        "trace_id": trace_id,
        "span_id": "ffffffffffffffff",
        "parent_span_id": "x",
        "name": "late",
        "service": "late-svc",
        "kind": 1,
        "status_code": 2,
        "start_ns": start + 10,
        "end_ns": start + 20,
        "attributes": "{}",
        "resource_attributes": "{}",
        "produced_ms": 0,
    }
    import pyarrow as pa

    from betrace.streams.schemas import SPAN_SCHEMA

    store.insert_spans("acme", pa.Table.from_pylist([late], schema=SPAN_SCHEMA))
    with store.cursor("acme") as con:
        merged = queries.get_trace(con, trace_id, tables=ColdCatalog(cold).attach(con))
    assert merged is not None
    assert merged["span_count"] == 11 and merged["error_count"] >= 1
    assert "late-svc" in merged["services"] and len(merged["spans"]) == 11
    report = asyncio.run(job.run(day=DAYS[0]))
    assert [(u.kind, u.part, u.rows) for u in report.units] == [("spans", 1, 1)]
    with store.cursor("acme") as con:
        after = queries.get_trace(con, trace_id, tables=ColdCatalog(cold).attach(con))
    assert after == merged


def test_cold_storage_refusing_access_keeps_the_day_hot_and_the_next_run_succeeds(
    store: TenantStore, cold: FilesystemColdStorage
) -> None:
    before = everything(store, None)
    job = make_job(store, cold)
    with refuse_writes(cold.root):
        report = asyncio.run(job.run())
    assert [u.state for u in report.units] == ["failed"]
    assert report.units[0].reason and report.units[0].reason.startswith("transient: upload failed")
    assert report.postponed == {"acme": 5}
    assert counts(store) == (3 * SPANS_PER_DAY, 3 * SIGNALS_PER_DAY)  # nothing left the hot store
    with store.cursor("acme") as con:
        (unit,) = state.units(con, "state = 'failed'")
    assert (unit.last_good, unit.attempts) == ("exported", 1)
    assert everything(store, cold) == before
    report = asyncio.run(job.run())
    assert {u.state for u in report.units} == {"cleaned"} and len(report.units) == 6
    assert report.units[0].resumed_from == "exported"
    assert counts(store) == (0, 0)
    assert everything(store, cold) == before


def test_a_corrupted_upload_is_caught_by_verification_before_anything_is_deleted(
    store: TenantStore, cold: FilesystemColdStorage
) -> None:
    job = make_job(store, cold)
    (unit,) = [u for u in asyncio.run(job.plan("acme", DAYS[0])) if u.kind == "spans"]
    unit = asyncio.run(job._export("acme", unit))
    unit = asyncio.run(job._upload("acme", unit))
    target = cold.root / unit.keys[0]
    target.write_bytes(target.read_bytes()[:-100] + b"\0" * 100)  # bit rot in cold storage
    report = asyncio.run(job.run(day=DAYS[0]))
    spans_unit = next(u for u in report.units if u.kind == "spans")
    assert spans_unit.state == "failed" and "verify failed" in (spans_unit.reason or "")
    assert counts(store)[0] == 3 * SPANS_PER_DAY
    report = asyncio.run(job.run(day=DAYS[0]))  # re-uploads from the staged copy, verifies, cleans
    assert [u.state for u in report.units] == ["cleaned"]
    assert counts(store)[0] == 2 * SPANS_PER_DAY


def test_audit_trail_has_a_run_with_phase_children(store: TenantStore, cold: FilesystemColdStorage) -> None:
    events: list[tuple[AuditEventType, str, EventRef | None, dict[str, Any] | None]] = []

    class ListRecorder:
        def record(self, event_type: AuditEventType, **kw: Any) -> EventRef:
            ref = EventRef.new()
            events.append((event_type, kw.get("outcome", "ok"), kw.get("parent"), kw.get("payload")))
            return ref

    asyncio.run(make_job(store, cold, audit=ListRecorder()).run(day=DAYS[0]))
    phases = [p["phase"] for t, _, parent, p in events if t == AuditEventType.ARCHIVAL_PHASE and p]
    assert phases == ["export", "upload", "verify", "cleanup"] * 2
    assert all(parent is not None for t, _, parent, _ in events if t == AuditEventType.ARCHIVAL_PHASE)
    assert [t for t, *_ in events].count(AuditEventType.ARCHIVAL_RUN) == 2


def test_retention_hook_follows_the_archive(store: TenantStore, cold: FilesystemColdStorage) -> None:
    status = StateArchiveStatus(store)
    assert status.archived_until_ns("acme") is None
    far = int(dt.datetime(2027, 1, 1, tzinfo=dt.UTC).timestamp() * 1e9)
    kept = store.apply_retention("acme", retention_s=86400, archive=status, now_ns=far)
    assert kept.deleted_spans == 0 and kept.awaiting_archive == 3 * SPANS_PER_DAY // 10
    asyncio.run(make_job(store, cold).run(day=DAYS[0]))
    until = status.archived_until_ns("acme")
    assert until == int(dt.datetime.combine(DAYS[1], dt.time(), dt.UTC).timestamp()) * 10**9
    result = store.apply_retention("acme", retention_s=86400, archive=status, now_ns=far)
    assert result.deleted_spans == 0  # archival already removed what was archived; the rest waits
    assert counts(store)[0] == 2 * SPANS_PER_DAY


def test_the_day_given_must_be_complete(store: TenantStore, cold: FilesystemColdStorage) -> None:
    from betrace.archive.job import ArchiveError

    with pytest.raises(ArchiveError, match="only days before today"):
        asyncio.run(make_job(store, cold).run(day=TODAY))


def test_hot_days_keeps_recent_days(store: TenantStore, cold: FilesystemColdStorage) -> None:
    job = make_job(store, cold)
    job.settings = job.settings.model_copy(update={"hot_days": 2})
    report = asyncio.run(job.run())
    assert sorted({u.day for u in report.units}) == DAYS[:2]


def test_state_survives_in_the_tenant_file(
    tmp_path: Path, store: TenantStore, cold: FilesystemColdStorage
) -> None:
    asyncio.run(make_job(store, cold).run(day=DAYS[0]))
    path = store.path("acme")
    store.close()
    with duckdb.connect(str(path), read_only=True) as con:
        units = state.units(con)
    assert {(u.kind, u.state, u.ledger_posted) for u in units} == {
        ("spans", "cleaned", False),
        ("signals", "cleaned", False),
    }


def test_s3_cold_storage_gives_the_same_answers(store: TenantStore, moto_s3: MotoS3, s3_bucket: str) -> None:
    from pydantic import SecretStr

    from betrace.sinks.cold import S3ColdStorage

    cold = S3ColdStorage(
        bucket=s3_bucket, endpoint=moto_s3.endpoint, access_key=SecretStr("a"), secret_key=SecretStr("b")
    )
    before = everything(store, None)
    report = asyncio.run(make_job(store, cold).run())
    assert {u.state for u in report.units} == {"cleaned"}
    assert counts(store) == (0, 0)
    assert everything(store, cold) == before
