"""Guarded sinks against real DuckDB files and a real read-only fault (chattr +i)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from tests.faults import read_only_dir

from betrace.config import Settings, load_settings
from betrace.errors import RuleError, SinkError
from betrace.metrics import InMemoryHooks
from betrace.resilience.guard import SpooledWriter, spoolable
from betrace.resilience.spool import Spool
from betrace.resilience.wiring import Resilience, decode_spans, encode_spans, spool_root
from betrace.sinks.duckdb_store import SpanStoreSink, TenantStore
from betrace.streams.schemas import SPAN_SCHEMA


def spans(first: int, n: int, tenant: str = "acme") -> pa.Table:
    return pa.table(
        {
            "tenant": [tenant] * n,
            "trace_id": [f"{(first + i) // 10:032x}" for i in range(n)],
            "span_id": [f"{first + i + 1:016x}" for i in range(n)],
            "parent_span_id": [None] * n,
            "name": ["db.query"] * n,
            "service": ["svc"] * n,
            "kind": [1] * n,
            "status_code": [0] * n,
            "start_ns": list(range(first, first + n)),
            "end_ns": list(range(first + 1, first + n + 1)),
            "attributes": ['{"k":1}'] * n,
            "resource_attributes": ['{"service.name":"svc"}'] * n,
            "produced_ms": [0] * n,
        },
        schema=SPAN_SCHEMA,
    )


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(
        data_dir=tmp_path / "data",
        resilience={
            "spool_dir": str(tmp_path / "spool"),  # on "another volume" than the data
            "breaker_min_calls": 2,
            "breaker_failure_ratio": 0.5,
            "breaker_reset_timeout_seconds": 0.3,
        },
    )


@pytest.fixture
def store(settings: Settings) -> Iterator[TenantStore]:
    store = TenantStore(settings.data_dir)
    yield store
    store.close()


def count(store: TenantStore) -> int:
    row = store.connection("acme").execute("SELECT count(*), count(DISTINCT span_id) FROM spans").fetchone()
    assert row is not None and row[0] == row[1]
    return int(row[0])


def test_spoolable_errors() -> None:
    assert spoolable(SinkError("disk"))
    assert spoolable(OSError("disk"))
    assert not spoolable(RuleError("bad rule"))
    assert not spoolable(ValueError("bug"))


def test_read_only_data_dir_spools_opens_the_breaker_and_recovers_exactly(
    settings: Settings, store: TenantStore
) -> None:
    hooks = InMemoryHooks()
    res = Resilience.build(settings, hooks=hooks)
    sink = SpanStoreSink(store, max_rows=100_000, hooks=hooks)
    res.guard_span_sink(sink, ["betrace.spans"])
    assert sink.writer is not None and sink.breaker is not None

    async def scenario() -> None:
        await sink.write([spans(0, 100)])  # opens the tenant file while writable
        with read_only_dir(settings.data_dir):
            for i in range(1, 6):
                await sink.write([spans(i * 100, 100)])
            assert sink.breaker is not None and sink.breaker.state == "open"
            assert sink.writer is not None and sink.writer.spool.items == 500
            assert await sink.writer.drain() == 0  # breaker open: no attempt
        await asyncio.sleep(0.35)  # reset timeout -> the next call is a trial
        # New writes queue behind the spool, so the store sees the original order.
        await sink.write([spans(600, 100)])
        await sink.write([spans(0, 100)])  # a replayed duplicate stores nothing twice

    asyncio.run(scenario())
    assert sink.breaker.state == "closed"
    assert sink.writer.spool.items == 0
    assert count(store) == 700
    assert hooks.total("betrace_spooled_total", spool="spans") == 500
    assert hooks.total("betrace_spool_replayed_total", spool="spans") == 500
    assert hooks.gauges[("betrace_spool_depth", (("spool", "spans"),))] == 0
    assert not any((spool_root(settings) / "spans").iterdir())
    res.close()


def test_spool_survives_a_restart_and_replays_first(settings: Settings, store: TenantStore) -> None:
    root = spool_root(settings) / "spans"
    spool = Spool(root, name="spans")
    spool.append([encode_spans([spans(0, 50)]), encode_spans([spans(50, 50)])])
    spool.close()  # the "previous process" stops with 100 spans spooled

    res = Resilience.build(settings)
    sink = SpanStoreSink(store, max_rows=100_000, hooks=InMemoryHooks())
    res.guard_span_sink(sink, [])
    assert sink.writer is not None and sink.writer.spool.items == 100
    asyncio.run(sink.write([spans(100, 10)]))
    assert count(store) == 110
    assert sink.writer.spool.items == 0
    res.close()


def test_replay_of_100k_spooled_items(tmp_path: Path, store: TenantStore) -> None:
    """100,000 spans spooled while the breaker is open, then synced (figure in docs/reliability.md)."""
    hooks = InMemoryHooks()
    cfg = load_settings(data_dir=tmp_path / "data", resilience={"breaker_reset_timeout_seconds": 600})
    res = Resilience.build(cfg, hooks=hooks)
    sink = SpanStoreSink(store, max_rows=100_000, hooks=hooks)
    res.guard_span_sink(sink, [])
    assert sink.writer is not None and sink.breaker is not None
    sink.breaker.open()

    async def scenario() -> float:
        for i in range(100):
            await sink.write([spans(i * 1000, 1000)])
        assert sink.writer is not None and sink.writer.spool.items == 100_000
        assert sink.breaker is not None
        sink.breaker.close()
        started = time.perf_counter()
        assert await sink.writer.drain() == 100_000
        return time.perf_counter() - started

    elapsed = asyncio.run(scenario())
    assert count(store) == 100_000
    assert sink.writer.spool.items == 0
    print(f"replayed 100,000 spooled spans in {elapsed:.2f}s")
    res.close()


def test_full_spool_blocks_the_write_until_replay_makes_room(tmp_path: Path, store: TenantStore) -> None:
    spool = Spool(tmp_path / "tiny", name="spans", max_bytes=40_000)
    written: list[int] = []
    healthy = asyncio.Event

    async def scenario() -> None:
        ok = healthy()

        async def write(batch: list[pa.Table]) -> None:
            if not ok.is_set():
                raise SinkError("store unavailable")
            written.extend(t.num_rows for t in batch)

        writer: SpooledWriter[pa.Table] = SpooledWriter(
            name="spans",
            spool=spool,
            write=write,
            encode=encode_spans,
            decode=decode_spans,
            full_retry_s=0.05,
        )
        await writer.write([spans(0, 200)])
        await writer.write([spans(200, 200)])
        assert writer.level() > 0.5
        blocked = asyncio.ensure_future(writer.write([spans(400, 400)]))
        await asyncio.sleep(0.3)
        assert not blocked.done()  # held, not dropped, not grown past the bound
        assert writer.level() == 1.0  # the stage's partitions pause meanwhile
        ok.set()
        await asyncio.wait_for(blocked, 5)
        await writer.drain()

    asyncio.run(scenario())
    assert sum(written) == 800
    assert spool.items == 0


def test_spool_on_the_read_only_volume_too_holds_the_batch(tmp_path: Path) -> None:
    """Default layout (spool under the data dir): both refuse writes, so the write waits."""
    cfg = load_settings(
        data_dir=tmp_path / "data",
        resilience={"breaker_min_calls": 1, "breaker_reset_timeout_seconds": 0.2},
    )
    store = TenantStore(cfg.data_dir)
    res = Resilience.build(cfg)
    sink = SpanStoreSink(store, max_rows=100_000, hooks=InMemoryHooks())
    res.guard_span_sink(sink, [])
    assert sink.writer is not None

    async def scenario() -> None:
        await sink.write([spans(0, 100)])
        assert sink.writer is not None
        sink.writer.full_retry_s = 0.05
        with read_only_dir(cfg.data_dir):
            held = asyncio.ensure_future(sink.write([spans(100, 100)]))
            await asyncio.sleep(0.5)
            assert not held.done()
            assert sink.writer.level() == 1.0
        await asyncio.wait_for(held, 5)  # durable now: stored, or spooled once writable again
        await asyncio.sleep(0.25)
        await sink.writer.drain()

    try:
        asyncio.run(scenario())
        assert count(store) == 200
    finally:
        res.close()
        store.close()
