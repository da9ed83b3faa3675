"""Tenant files from before the integer span key are re-keyed once, losing nothing."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from betrace.errors import SinkError
from betrace.sinks.duckdb_store import TenantStore
from betrace.sinks.store_schema import SCHEMA_SQL, SPAN_COLUMNS_SQL, SPANS_TABLE_SQL
from betrace.streams.otlp import OtlpDecoder, Record
from betrace.workload.generator import TraceGenerator
from betrace.workload.otlp import batch_messages

#: The ``spans`` table as files written before 2026-12-02 hold it.
VARCHAR_KEYED = """
CREATE TABLE spans (
    tenant VARCHAR NOT NULL, trace_id VARCHAR NOT NULL, span_id VARCHAR NOT NULL,
    parent_span_id VARCHAR, name VARCHAR NOT NULL, service VARCHAR, kind TINYINT NOT NULL,
    status_code TINYINT NOT NULL, start_ns BIGINT NOT NULL, end_ns BIGINT NOT NULL,
    attributes JSON NOT NULL, resource_attributes JSON NOT NULL, produced_ms BIGINT NOT NULL,
    PRIMARY KEY (trace_id, span_id)
);
"""


@pytest.fixture(scope="module")
def spans() -> pa.Table:
    generator = TraceGenerator(tenants=("acme",), violation_rate=0.3, seed=4)
    records = [Record(m.value) for m in batch_messages(generator.traces(200), spans_per_message=100)]
    return OtlpDecoder(encoding="otlp_proto", tenant_header="h", default_tenant="acme").decode(records).spans


def test_an_old_file_is_rekeyed_and_still_dedupes(tmp_path: Path, spans: pa.Table) -> None:
    data = tmp_path / "data"
    path = TenantStore(data).path("acme")
    path.parent.mkdir(parents=True)
    old, later = spans.slice(0, spans.num_rows // 2), spans.slice(spans.num_rows // 2)
    with duckdb.connect(str(path)) as con:
        con.execute(VARCHAR_KEYED)
        con.execute(SCHEMA_SQL.replace(SPANS_TABLE_SQL, ""))  # the other tables, as they were
        con.register("_old", old)
        con.execute("INSERT INTO spans SELECT * FROM _old")
    store = TenantStore(data)
    try:
        # Re-keyed on open: every row kept, a replay of them stores nothing, new spans are stored.
        assert store.insert_spans("acme", old) == 0
        assert store.insert_spans("acme", later) == later.num_rows
        assert store.insert_spans("acme", spans) == 0
        assert store.span_counts() == {"acme": (spans.num_rows, spans.num_rows)}
        con = store.connection("acme")
        stored = con.sql(f"SELECT {SPAN_COLUMNS_SQL} FROM spans ORDER BY trace_id, span_id").to_arrow_table()
        order = pc.sort_indices(spans, [("trace_id", "ascending"), ("span_id", "ascending")])
        assert stored.to_pylist() == spans.take(order).to_pylist()
        keys = con.execute(
            "SELECT count(*) FROM duckdb_constraints() WHERE table_name = 'spans' "
            "AND constraint_type = 'PRIMARY KEY' AND constraint_column_names = ['trace_key', 'span_key']"
        ).fetchone()
        assert keys == (1,)
        leftover = con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name LIKE '_spans%'")
        assert leftover.fetchone() == (0,)
    finally:
        store.close()


def test_an_invalid_id_is_refused_with_the_reason(tmp_path: Path, spans: pa.Table) -> None:
    """Ingest admits only hex ids; a batch that is not must fail loudly, not be stored."""
    bad = spans.slice(0, 3).set_column(1, "trace_id", pa.array(["not-hex"] * 3, pa.string()))
    store = TenantStore(tmp_path / "data")
    try:
        with pytest.raises(SinkError, match="span insert failed") as info:
            store.insert_spans("acme", bad)
        assert "not-hex" in str(info.value)
        assert store.span_counts() == {"acme": (0, 0)}
    finally:
        store.close()
