"""Extra CPU per ingest batch for the ``betrace.store`` copy: split by tenant + Arrow IPC encode.

Run: ``.venv/bin/python benchmarks/bench_store_copy.py`` (a few seconds). Compares the
existing per-trace-partition encode for ``betrace.spans`` with the added per-tenant
encode for ``betrace.store`` on one 20k-span batch of five tenants.
"""

from __future__ import annotations

import time

import pyarrow as pa

from betrace.agents.app import MAX_ROWS_PER_MESSAGE, chunk_by_trace
from betrace.streams.codecs import table_to_ipc
from betrace.streams.otlp import OtlpDecoder, Record
from betrace.streams.topics import split_by_partition, split_by_tenant, tenant_partition
from betrace.workload.generator import TraceGenerator
from betrace.workload.otlp import batch_messages

gen = TraceGenerator(tenants=("default", "acme", "initech", "t2", "t3"), violation_rate=0.05, seed=1)
records = [Record(m.value) for m in batch_messages(gen.traces(20_000), spans_per_message=40)]
table = OtlpDecoder(encoding="otlp_proto", tenant_header="h", default_tenant="x").decode(records).spans
print("batch rows", table.num_rows)


def spans_path() -> None:
    for _, t in split_by_partition(table, 4):
        for c in chunk_by_trace(t, MAX_ROWS_PER_MESSAGE):
            table_to_ipc(c)


parts = [t for _, t in split_by_partition(table, 4)]


def store_path() -> None:
    for tenant, t in split_by_tenant(pa.concat_tables(parts)):
        tenant_partition(tenant, 4)
        for c in chunk_by_trace(t, MAX_ROWS_PER_MESSAGE):
            table_to_ipc(c)


for name, fn in (("spans topic (existing)", spans_path), ("store topic (added)", store_path)):
    fn()
    n = 50
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    dt = (time.perf_counter() - t0) / n
    print(f"{name}: {dt * 1e3:.2f} ms per batch, {table.num_rows / dt / 1e6:.2f} M spans/s")
