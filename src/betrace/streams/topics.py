"""Topic layout, partitioning and dead-letter headers."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from betrace.config import Settings
from betrace.streams.otlp import DeadLetter

logger = logging.getLogger(__name__)

#: Header names added to every dead letter (values are UTF-8).
DLQ_REASON = "betrace.reason"
DLQ_DETAIL = "betrace.detail"
DLQ_TOPIC = "betrace.source.topic"
DLQ_PARTITION = "betrace.source.partition"
DLQ_OFFSET = "betrace.source.offset"


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str]


def topic_specs(settings: Settings) -> list[TopicSpec]:
    """Every topic a worker reads or writes, with its layout."""
    t = settings.topics
    internal = {"retention.ms": str(24 * 3600 * 1000)}
    return [
        TopicSpec(t.input, t.partitions, {}),
        TopicSpec(t.spans, t.partitions, internal),
        TopicSpec(t.traces, t.partitions, internal),
        TopicSpec(t.store, t.partitions, internal),
        TopicSpec(verdicts_topic(settings), t.partitions, internal),
        TopicSpec(t.signals, t.partitions, {}),
        TopicSpec(t.dlq, 1, {}),
    ]


def verdicts_topic(settings: Settings) -> str:
    """Evaluate -> signal sink: candidate signals before deduplication."""
    return f"{settings.topics.signals}.pending"


def dead_letter_headers(dead: DeadLetter) -> list[tuple[str, bytes]]:
    """Original headers plus the reason and the source coordinates."""
    rec = dead.record
    extra = [
        (DLQ_REASON, dead.reason.encode()),
        (DLQ_DETAIL, dead.detail[:2000].encode()),
        (DLQ_TOPIC, rec.topic.encode()),
        (DLQ_PARTITION, str(rec.partition).encode()),
        (DLQ_OFFSET, str(rec.offset).encode()),
    ]
    return [*rec.headers, *extra]


def partition_of(trace_ids: Iterable[str], partitions: int) -> list[int]:
    """Stable trace-id partitioning, identical in every process and language."""
    return [int(t[:8], 16) % partitions for t in trace_ids]


def tenant_partition(tenant: str, partitions: int) -> int:
    """Stable tenant partitioning (first 4 bytes of SHA-256, big-endian), the same everywhere.

    ``betrace.store`` and ``betrace.signals.pending`` use it, so the worker that
    holds partition ``p`` of both owns every tenant that hashes to ``p``: its
    DuckDB file and its embedded ledger file (see docs/architecture.md).
    """
    return int.from_bytes(hashlib.sha256(tenant.encode()).digest()[:4], "big") % partitions


def partition_column(trace_ids: pa.Array | pa.ChunkedArray, partitions: int) -> pa.Array:
    """:func:`partition_of` for every row, with Python work per distinct trace only."""
    if isinstance(trace_ids, pa.ChunkedArray):
        trace_ids = trace_ids.combine_chunks()
    encoded = pc.dictionary_encode(trace_ids)
    per_trace = pa.array(partition_of(encoded.dictionary.to_pylist(), partitions), pa.int32())
    return pc.take(per_trace, encoded.indices)


def split_by_partition(table: pa.Table, partitions: int) -> list[tuple[int, pa.Table]]:
    """Split a span table into one table per target partition of the trace id."""
    if table.num_rows == 0:
        return []
    if partitions == 1:
        return [(0, table)]
    parts = partition_column(table.column("trace_id"), partitions)
    return [(p, table.filter(pc.equal(parts, p))) for p in pc.unique(parts).to_pylist()]


def tenant_rows(table: pa.Table) -> dict[str, int]:
    """Rows per tenant."""
    return {str(d["values"]): int(d["counts"]) for d in pc.value_counts(table.column("tenant")).to_pylist()}


def split_by_tenant(table: pa.Table) -> list[tuple[str, pa.Table]]:
    """One table per tenant: rules and storage are isolated per tenant."""
    tenants = table.column("tenant")
    unique = pc.unique(tenants).to_pylist()
    if len(unique) == 1:
        return [(unique[0], table)]
    return [(t, table.filter(pc.equal(tenants, t))) for t in unique]
