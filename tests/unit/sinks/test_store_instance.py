"""All tenant files of a store share one DuckDB instance: one memory limit, one thread pool."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from tests.spans import generated_spans

from betrace.archive import state as archive_state
from betrace.integrity import store as integrity_store
from betrace.metrics import InMemoryHooks
from betrace.sinks.attached import SPILL_DIR, AttachedFiles, spill_dir
from betrace.sinks.duckdb_store import TenantStore
from betrace.sinks.ledger import TenantLedgers, tenant_ledger_path
from betrace.streams.topics import split_by_tenant

TENANTS = tuple(f"t{i}" for i in range(8))


@pytest.fixture(scope="module")
def spans() -> dict[str, pa.Table]:
    return dict(split_by_tenant(generated_spans(TENANTS, 400, seed=5)))


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_tenant_files_share_one_instance_and_its_memory_limit(
    tmp_path: Path, spans: dict[str, pa.Table]
) -> None:
    store = TenantStore(tmp_path, memory_mib=96)
    try:
        store.insert_spans(TENANTS[0], spans[TENANTS[0]])
        before = _threads()
        for tenant in TENANTS[1:]:
            store.insert_spans(tenant, spans[tenant])
        # A DuckDB instance per file started ~9 threads each (benchmarks/RESULTS.md).
        assert _threads() - before < len(TENANTS) - 1
        for tenant in TENANTS:
            with store.cursor(tenant) as con:
                # The shared cache plus 2 MiB per attached file (what each holds unevictably).
                assert con.execute("SELECT current_setting('memory_limit')").fetchone() == ("112.0 MiB",)
                attached = con.execute(
                    "SELECT count(*) FROM duckdb_databases() WHERE NOT internal"
                ).fetchone()
                assert attached == (len(TENANTS) + 1,)  # every tenant file, plus the instance's own memory
                stored = con.execute("SELECT count(*) FROM spans").fetchone()
                assert stored == (spans[tenant].num_rows,)  # each cursor sees its own tenant's file only
    finally:
        store.close()


def test_catalog_probes_see_only_their_own_tenant(tmp_path: Path, spans: dict[str, pa.Table]) -> None:
    store = TenantStore(tmp_path)
    try:
        for tenant in TENANTS[:2]:
            store.insert_spans(tenant, spans[tenant])
        with store.cursor(TENANTS[0]) as con:
            integrity_store.ensure_schema(con)
            archive_state.ensure_schema(con)
        with store.cursor(TENANTS[0]) as con:
            assert integrity_store.has_table(con)
            assert archive_state.has_table(con)
        with store.cursor(TENANTS[1]) as con:
            assert not integrity_store.has_table(con)
            assert not archive_state.has_table(con)
            assert integrity_store.count_by_kind(con) == {}
    finally:
        store.close()


def test_close_detaches_every_file_for_other_processes(tmp_path: Path, spans: dict[str, pa.Table]) -> None:
    store = TenantStore(tmp_path)
    for tenant in TENANTS[:3]:
        store.insert_spans(tenant, spans[tenant])
    store.close()
    code = (
        "import duckdb, sys\n"
        "for p in sys.argv[1:]:\n"
        "    con = duckdb.connect(p)\n"
        "    print(con.execute('SELECT count(*) FROM spans').fetchone()[0], flush=True)\n"
        "    con.close()\n"
    )
    paths = [str(store.path(t)) for t in TENANTS[:3]]
    out = subprocess.run(
        [sys.executable, "-c", code, *paths], capture_output=True, text=True, check=True, timeout=60
    )
    assert [int(n) for n in out.stdout.split()] == [spans[t].num_rows for t in TENANTS[:3]]


def test_a_read_only_store_attaches_read_only(tmp_path: Path, spans: dict[str, pa.Table]) -> None:
    writer = TenantStore(tmp_path)
    writer.insert_spans(TENANTS[0], spans[TENANTS[0]])
    writer.close()
    reader = TenantStore(tmp_path, read_only=True)
    try:
        with reader.cursor(TENANTS[0]) as con:
            assert con.execute("SELECT count(*) FROM spans").fetchone() == (spans[TENANTS[0]].num_rows,)
            with pytest.raises(Exception, match="read-only"):
                con.execute("DELETE FROM spans")
    finally:
        reader.close()


@pytest.mark.asyncio
async def test_tenant_ledgers_attach_to_the_store_instance(
    tmp_path: Path, spans: dict[str, pa.Table]
) -> None:
    store = TenantStore(tmp_path)
    ledgers = TenantLedgers(tmp_path, hooks=InMemoryHooks(), files=store.files)
    try:
        tenants = TENANTS[:3]
        for tenant in tenants:
            await store.run(store.insert_spans, tenant, spans[tenant])
        before = _threads()
        docs = [_signal(t, i) for t in tenants for i in range(4)]
        assert await ledgers.record(docs) == (len(docs), 0)
        assert len(store.files) == 2 * len(tenants)  # a store file and a ledger file per tenant
        # Each ledger's own writer thread (SignalLedger) and none of DuckDB's (9 per instance).
        assert _threads() - before <= len(tenants) + 1
        assert [[c.signals for c in ledgers.counts(t, "r1")] for t in tenants] == [[4]] * len(tenants)
        assert sorted(await ledgers.release(list(tenants))) == sorted(tenants)
        assert len(store.files) == len(tenants)
        # Detached: the file is free for another process (the next owner).
        code = (
            "import duckdb, sys\n"
            "print(duckdb.connect(sys.argv[1]).execute('SELECT count(*) FROM transfers').fetchone()[0])"
        )
        path = tenant_ledger_path(tmp_path, tenants[0])
        out = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c", code, str(path)],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        assert int(out.stdout) >= 4
    finally:
        await ledgers.close()
        store.close()


def _signal(tenant: str, i: int) -> dict[str, object]:
    return {
        "tenant": tenant,
        "rule_id": "r1",
        "rule_version": 1,
        "trace_id": f"{i:032x}",
        "severity": "high",
        "source_produced_ms": 1,
    }


def _spill(data_dir: Path) -> list[Path]:
    """Write more than a 32 MiB instance holds before a checkpoint; the spill files DuckDB made."""
    files = AttachedFiles(
        memory_mib=32, temp_dir=spill_dir(data_dir), settings={"checkpoint_threshold": "1GiB"}
    )
    try:
        con = files.cursor(files.attach(data_dir / "a.duckdb"))
        con.execute("CREATE TABLE t (k BIGINT PRIMARY KEY, v VARCHAR)")
        for i in range(200):  # ~130 MiB not yet checkpointed
            con.execute("INSERT INTO t SELECT range + ?, repeat('x', 100) FROM range(5000)", [i * 5000])
        spilled = [Path(r[0]) for r in con.execute("SELECT path FROM duckdb_temporary_files()").fetchall()]
        assert con.execute("SELECT count(*) FROM t").fetchone() == (1_000_000,)
        con.close()
        return spilled
    finally:
        files.close()


def test_spills_go_to_this_process_directory(tmp_path: Path) -> None:
    # A data directory without a spill directory yet: DuckDB creates only the last level.
    spilled = _spill(tmp_path)
    assert spilled
    assert all(p.parent == tmp_path / f"{SPILL_DIR}-{os.getpid()}" for p in spilled)


def test_spill_directories_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    stale = tmp_path / f"{SPILL_DIR}-{int(dead.stdout)}"
    stale.mkdir()
    (stale / "duckdb_temp_block-1.block").write_bytes(b"x")
    assert spill_dir(tmp_path) == tmp_path / f"{SPILL_DIR}-{os.getpid()}"
    assert not stale.exists()
