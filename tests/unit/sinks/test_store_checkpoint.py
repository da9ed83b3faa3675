"""The store's checkpoint threshold: applied to writer files, and a killed writer loses nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa

from betrace.sinks.duckdb_store import DEFAULT_CHECKPOINT_MIB, TenantStore
from betrace.streams.otlp import OtlpDecoder, Record
from betrace.workload.generator import TraceGenerator
from betrace.workload.otlp import batch_messages

WRITER = """
import sys
from pathlib import Path
from betrace.sinks.duckdb_store import TenantStore
from tests.unit.sinks.test_store_checkpoint import spans

store = TenantStore(Path(sys.argv[1]), checkpoint_mib=1024)
print(store.upsert_spans("acme", spans()).inserted, flush=True)
sys.stdin.read()  # killed here: the rows are only in the write-ahead log
"""


def spans() -> pa.Table:
    gen = TraceGenerator(tenants=("acme",), violation_rate=0.2, seed=5)
    records = [Record(m.value) for m in batch_messages(gen.traces(300), spans_per_message=100)]
    return OtlpDecoder(encoding="otlp_proto", tenant_header="h", default_tenant="acme").decode(records).spans


def _setting(store: TenantStore, tenant: str) -> str:
    row = store.connection(tenant).execute("SELECT current_setting('checkpoint_threshold')").fetchone()
    assert row is not None
    return str(row[0])


def test_writer_files_use_the_configured_threshold(tmp_path: Path) -> None:
    default = TenantStore(tmp_path / "a")
    tuned = TenantStore(tmp_path / "b", checkpoint_mib=7)
    try:
        assert _setting(default, "acme") == f"{DEFAULT_CHECKPOINT_MIB}.0 MiB"
        assert _setting(tuned, "acme") == "7.0 MiB"
    finally:
        default.close()
        tuned.close()


def test_spans_only_in_the_log_survive_a_kill_9(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[3]
    with subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=root,
    ) as proc:
        assert proc.stdout is not None
        stored = int(proc.stdout.readline())
        wal = tmp_path / "tenant=acme.duckdb.wal"
        assert wal.exists() and wal.stat().st_size > 0  # not checkpointed yet
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    table = spans()
    store = TenantStore(tmp_path)
    try:
        assert stored == table.num_rows
        assert store.span_counts() == {"acme": (stored, stored)}
        assert store.upsert_spans("acme", table).inserted == 0  # the replay after the crash adds nothing
    finally:
        store.close()
