"""Tenant ownership of the DuckDB store and the per-tenant embedded ledgers (real files, real processes)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
from tests.spans import generated_spans

from betrace.metrics import InMemoryHooks
from betrace.sinks.duckdb_store import NotOwnerError, StoreBusyError, TenantStore
from betrace.sinks.ledger import LedgerLockedError, TenantLedgers, tenant_ledger_path
from betrace.streams.topics import split_by_tenant, tenant_partition

# default and acme hash to partition 1 of 4, initech to 2 (asserted below).
TENANTS = ("default", "initech")


@pytest.fixture(scope="module")
def spans() -> dict[str, pa.Table]:
    return dict(split_by_tenant(generated_spans(TENANTS, 200, seed=3)))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TenantStore]:
    store = TenantStore(tmp_path, open_timeout_s=5.0)
    store.track_ownership(4)
    yield store
    store.close()


@contextmanager
def held_by_another_process(path: Path, seconds: float) -> Iterator[subprocess.Popen[str]]:
    """A real second process that opens ``path`` for writing and holds it for ``seconds``."""
    code = (
        "import duckdb, sys, time\n"
        "con = duckdb.connect(sys.argv[1])\n"
        "print('held', flush=True)\n"
        "time.sleep(float(sys.argv[2]))\n"
        "con.close()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(path), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "held"
    try:
        yield proc
    finally:
        proc.wait(timeout=30)
        proc.stdout.close()


def test_tenant_partition_is_stable_sha256_prefix() -> None:
    assert [tenant_partition(t, 4) for t in ("default", "acme", "initech", "t2", "t3")] == [1, 1, 2, 3, 0]
    assert all(0 <= tenant_partition(f"tenant-{i}", 7) < 7 for i in range(100))


def test_a_tracking_store_writes_only_the_tenants_it_owns(
    store: TenantStore, spans: dict[str, pa.Table], tmp_path: Path
) -> None:
    with pytest.raises(NotOwnerError, match="owned by another worker"):
        store.insert_spans("default", spans["default"])  # owns nothing before an assignment
    store.assign({1})
    assert store.insert_spans("default", spans["default"]) == spans["default"].num_rows
    with pytest.raises(NotOwnerError, match="partition 2"):
        store.insert_spans("initech", spans["initech"])
    assert not store.path("initech").exists()
    TenantStore(tmp_path).insert_spans("initech", spans["initech"])  # (the other owner)
    assert store.all_tenants() == ["default", "initech"]
    assert store.tenants() == store.owned_tenants() == ["default"]


@pytest.mark.asyncio
async def test_release_closes_the_files_for_the_next_owner_and_journals_the_session(
    store: TenantStore, spans: dict[str, pa.Table]
) -> None:
    store.assign({1, 2})
    for tenant, table in spans.items():
        await store.run(store.insert_spans, tenant, table)
    assert await store.release({2}) == ["initech"]
    assert store.owns("default")
    assert not store.owns("initech")
    # The file is free: another process can open it for writing now.
    with held_by_another_process(store.path("initech"), 0.1):
        pass
    con = duckdb.connect(str(store.path("initech")), read_only=True)
    try:
        rows = con.execute("SELECT pid, opened_ns, closed_ns FROM _writer_sessions").fetchall()
    finally:
        con.close()
    assert len(rows) == 1
    assert rows[0][2] is not None
    assert rows[0][2] >= rows[0][1]


def test_an_owner_waits_for_the_previous_owner_to_close(tmp_path: Path, spans: dict[str, pa.Table]) -> None:
    store = TenantStore(tmp_path, open_timeout_s=20.0)
    with held_by_another_process(store.path("default"), 1.5):
        assert store.insert_spans("default", spans["default"]) == spans["default"].num_rows
    store.close()
    impatient = TenantStore(tmp_path, open_timeout_s=0.3)
    with (
        held_by_another_process(impatient.path("acme"), 3.0),
        pytest.raises(StoreBusyError, match="held by another process"),
    ):
        impatient.insert_spans("acme", spans["default"])
    impatient.close()


def test_reads_of_a_tenant_owned_elsewhere_are_read_only_or_busy(
    store: TenantStore, spans: dict[str, pa.Table], tmp_path: Path
) -> None:
    other = TenantStore(tmp_path)
    other.insert_spans("initech", spans["initech"])
    other.close()
    store.assign({1})
    with store.cursor("initech") as con:  # nobody holds it: a short read-only open
        row = con.execute("SELECT count(*) FROM spans").fetchone()
        assert row == (spans["initech"].num_rows,)
        with pytest.raises(duckdb.Error, match="read-only"):
            con.execute("DELETE FROM spans")
    with (
        held_by_another_process(store.path("initech"), 2.0),
        pytest.raises(StoreBusyError, match="owned by another worker"),
        store.cursor("initech"),
    ):
        pass


def _signal(tenant: str, rule: str, i: int) -> dict[str, object]:
    return {
        "tenant": tenant,
        "rule_id": rule,
        "rule_version": 1,
        "trace_id": f"{i:032x}",
        "severity": "high",
        "source_produced_ms": 1,
    }


@pytest.mark.asyncio
async def test_tenant_ledgers_keep_one_file_per_owned_tenant(tmp_path: Path) -> None:
    owned = {"default"}
    ledgers = TenantLedgers(tmp_path, hooks=InMemoryHooks(), owns=lambda t: t in owned)
    docs = [_signal("default", "r1", i) for i in range(5)] + [_signal("default", "r2", 9)]
    assert await ledgers.record(docs) == (6, 0)
    assert await ledgers.record(docs[:2]) == (0, 2)  # a replay counts nothing twice
    assert [c.signals for c in await ledgers.run(ledgers.counts, "default", "r1")] == [5]
    # One batch of several tenants: each on its own ledger, written at once.
    owned.update({"acme", "globex"})
    mixed = [_signal(t, "r1", i) for i in range(3) for t in ("acme", "globex", "default")]
    assert await ledgers.record(mixed) == (6, 3)
    assert [[c.signals for c in ledgers.counts(t, "r1")] for t in ("acme", "globex")] == [[3], [3]]
    owned.difference_update({"acme", "globex"})
    assert sorted(await ledgers.release(["acme", "globex"])) == ["acme", "globex"]
    assert tenant_ledger_path(tmp_path, "default").exists()
    with pytest.raises(LedgerLockedError, match="another worker owns"):
        await ledgers.record([_signal("initech", "r1", 1)])
    assert await ledgers.release(["default"]) == ["default"]
    # Released: read-only from the file, and the next owner can open it.
    assert [c.signals for c in ledgers.counts("default", "r2")] == [1]
    with held_by_another_process(tenant_ledger_path(tmp_path, "default"), 0.1):
        pass
    await ledgers.close()
