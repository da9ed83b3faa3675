"""Arrow IPC / JSON codecs, trace-id partitioning and dead-letter headers."""

from __future__ import annotations

import contextlib
from collections import Counter
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from betrace.config import Settings
from betrace.errors import ValueDecodeError
from betrace.streams.codecs import dumps, ipc_to_table, loads, table_to_ipc
from betrace.streams.otlp import DeadLetter, OtlpDecoder, Record
from betrace.streams.schemas import SPAN_SCHEMA
from betrace.streams.topics import (
    DLQ_DETAIL,
    DLQ_OFFSET,
    DLQ_PARTITION,
    DLQ_REASON,
    DLQ_TOPIC,
    dead_letter_headers,
    partition_of,
    split_by_partition,
    split_by_tenant,
    topic_specs,
    verdicts_topic,
)
from betrace.workload.generator import TraceGenerator
from betrace.workload.otlp import batch_messages


@pytest.fixture(scope="module")
def spans() -> pa.Table:
    """A real span table: generated traces of three tenants, decoded from OTLP."""
    generator = TraceGenerator(tenants=("default", "acme", "globex"), violation_rate=0.1, seed=5)
    records = [Record(m.value) for m in batch_messages(generator.traces(1_500), spans_per_message=100)]
    decoded = OtlpDecoder(encoding="otlp_proto", tenant_header="h", default_tenant="default").decode(records)
    assert decoded.dead_letters == []
    return decoded.spans


def keys(table: pa.Table) -> Counter[tuple[str, str, str]]:
    cols = table.select(["tenant", "trace_id", "span_id"]).to_pydict()
    return Counter(zip(cols["tenant"], cols["trace_id"], cols["span_id"], strict=True))


def test_ipc_round_trip_keeps_schema_and_rows(spans: pa.Table) -> None:
    data = table_to_ipc(spans)
    back = ipc_to_table(data)
    assert back.schema == SPAN_SCHEMA
    assert back.equals(spans)
    assert len(data) < spans.nbytes  # LZ4-compressed buffers


def test_ipc_round_trip_of_empty_and_chunked_tables(spans: pa.Table) -> None:
    empty = SPAN_SCHEMA.empty_table()
    assert ipc_to_table(table_to_ipc(empty)).equals(empty)
    chunked = pa.concat_tables([spans.slice(0, 10), spans.slice(10, 20)])
    assert ipc_to_table(table_to_ipc(chunked)).equals(chunked)


@pytest.mark.parametrize("cut", ["empty", "half", "garbage", "json", "bad-length"])
def test_corrupt_ipc_is_value_decode_error(spans: pa.Table, cut: str) -> None:
    data = table_to_ipc(spans.slice(0, 50))
    bad = {
        "empty": b"",
        "half": data[: len(data) // 2],
        "garbage": b"\xff" * 64,
        "json": b'{"not": "arrow"}',
        "bad-length": data[:4] + b"\xff\xff\xff\x7f" + data[8:],  # metadata longer than the data
    }[cut]
    with pytest.raises(ValueDecodeError) as info:
        ipc_to_table(bad)
    assert info.value.reason == "invalid_value"
    assert str(info.value).startswith("not an Arrow IPC stream")


def test_any_single_byte_corruption_is_value_decode_error() -> None:
    data = table_to_ipc(pa.table({"a": pa.array([1, 2, 3], pa.int64())}))
    for position in range(len(data)):
        for byte in (0x00, 0x7F):
            corrupt = bytearray(data)
            corrupt[position] = byte
            with contextlib.suppress(ValueDecodeError):
                ipc_to_table(bytes(corrupt))


def test_json_codec_round_trip_and_utc_datetimes() -> None:
    doc = {"n": 1, "s": "é", "l": [1.5, None], "naive": datetime(2024, 1, 2, 3, 4, 5)}
    doc["aware"] = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    data = dumps(doc)
    assert loads(data) == {
        "n": 1,
        "s": "é",
        "l": [1.5, None],
        "naive": "2024-01-02T03:04:05Z",
        "aware": "2024-01-02T03:04:05Z",
    }
    with pytest.raises(ValueDecodeError, match="not valid JSON"):
        loads(b"{broken")


def test_partition_of_is_stable() -> None:
    ids = [
        "0af7651916cd43dd8448eb211c80319c",
        "ffffffff000000000000000000000000",
        "00000000ffffffffffffffffffffffff",
        "4bf92f3577b34da6a3ce929d0e0e4736",
    ]
    # Fixed values: every process and language must agree (first 8 hex digits mod n).
    assert partition_of(ids, 4) == [1, 3, 0, 1]
    assert partition_of(ids, 7) == [2, 3, 0, 2]
    assert partition_of(ids, 1) == [0, 0, 0, 0]
    assert partition_of(ids[:1], 1024) == [0x0AF76519 % 1024]


@pytest.mark.parametrize("partitions", [1, 2, 3, 16])
def test_split_by_partition_preserves_rows(spans: pa.Table, partitions: int) -> None:
    parts = split_by_partition(spans, partitions)
    assert sum(t.num_rows for _, t in parts) == spans.num_rows
    assert sum((keys(t) for _, t in parts), Counter()) == keys(spans)
    assert len({p for p, _ in parts}) == len(parts)
    for partition, table in parts:
        assert 0 <= partition < partitions
        assert table.schema == spans.schema
        assert set(partition_of(table.column("trace_id").to_pylist(), partitions)) == {partition}


def test_split_by_partition_edge_cases(spans: pa.Table) -> None:
    assert split_by_partition(spans.slice(0, 0), 4) == []
    [(partition, table)] = split_by_partition(spans, 1)
    assert partition == 0
    assert table is spans


def test_split_by_tenant_preserves_rows(spans: pa.Table) -> None:
    parts = dict(split_by_tenant(spans))
    assert set(parts) == {"default", "acme", "globex"}
    assert sum((keys(t) for t in parts.values()), Counter()) == keys(spans)
    for tenant, table in parts.items():
        assert set(table.column("tenant").to_pylist()) == {tenant}
    one = spans.filter(pc.equal(spans.column("tenant"), "acme"))
    assert split_by_tenant(one) == [("acme", one)]


def test_dead_letter_headers_keep_originals_and_add_coordinates() -> None:
    original = [("X-Scope-OrgID", b"acme"), ("traceparent", b"00-abc"), ("X-Scope-OrgID", b"dup")]
    record = Record(b"\x00", headers=original, topic="otlp_spans", partition=3, offset=1234)
    headers = dead_letter_headers(DeadLetter(record, "invalid_value", "x" * 5000))
    assert headers[:3] == original
    extra = dict(headers[3:])
    assert extra == {
        DLQ_REASON: b"invalid_value",
        DLQ_DETAIL: b"x" * 2000,
        DLQ_TOPIC: b"otlp_spans",
        DLQ_PARTITION: b"3",
        DLQ_OFFSET: b"1234",
    }
    assert all(isinstance(v, bytes) for _, v in headers)


def test_topic_specs_follow_settings() -> None:
    cfg = Settings(topics={"partitions": 6, "signals": "sig"})
    specs = {s.name: s for s in topic_specs(cfg)}
    assert verdicts_topic(cfg) == "sig.pending"
    assert set(specs) == {
        "otlp_spans",
        "betrace.spans",
        "betrace.store",
        "betrace.traces",
        "sig.pending",
        "sig",
        "betrace.dlq",
    }
    assert specs["betrace.dlq"].partitions == 1
    assert {specs[n].partitions for n in specs if n != "betrace.dlq"} == {6}
    assert specs["betrace.spans"].config == {"retention.ms": str(24 * 3600 * 1000)}
    assert specs["otlp_spans"].config == {}
