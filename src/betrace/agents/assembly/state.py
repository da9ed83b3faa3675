"""Per-trace assembly state and its changelog encoding.

Two kinds of entries live in faust tables (changelog topics on Kafka), keyed
by trace id and written to the partition of the trace (the same partition as
the trace's spans on ``betrace.spans``, so recovery and assignment agree):

* an *open trace* checkpoint: counters, per-rule summaries, the carried
  overlap and the spans of the window being filled (at most one window);
* a *decision*: what was decided for a closed trace, kept for late spans.

Both carry ``hw``, the highest ``betrace.spans`` offset already applied to the
trace: when input is replayed after a crash, rows from offsets ``<= hw`` are
already in the state and are skipped, so nothing is counted twice.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import orjson
import pyarrow as pa

from betrace.agents.assembly.summary import RuleSummary, Summaries
from betrace.streams.codecs import ipc_to_table, table_to_ipc
from betrace.streams.schemas import SPAN_SCHEMA

_MAGIC = b"BTA1"
_HEAD = struct.Struct(">I")
EMPTY = SPAN_SCHEMA.empty_table()


@dataclass(slots=True)
class OpenTrace:
    """A live trace: the window being filled plus what earlier windows left behind."""

    trace_id: str
    tenant: str
    partition: int
    first_seen: float
    last_seen: float
    chunks: list[pa.Table] = field(default_factory=list)  # rows not yet in a window, arrival order
    rows: int = 0
    overlap: pa.Table = field(
        default_factory=lambda: EMPTY
    )  # carried rows of the last window: context, never counted again
    held: set[int] = field(default_factory=set)  # message seqs whose rows here are not durable
    dirty_since: float | None = None
    hw: int = -1
    windows: int = 0
    spans: int = 0
    bytes: int = 0
    summaries: Summaries = field(default_factory=dict)
    checkpointed: bool = False

    def pending(self) -> pa.Table:
        """Overlap followed by the new rows (arrival order)."""
        parts = [self.overlap, *self.chunks] if self.overlap.num_rows else self.chunks
        if not parts:
            return EMPTY
        return parts[0] if len(parts) == 1 else pa.concat_tables(parts)

    def held_bytes(self) -> int:
        return int(self.overlap.nbytes) + sum(int(c.nbytes) for c in self.chunks)


@dataclass(slots=True)
class Decision:
    """A closed trace's outcome, remembered for late spans and replay deduplication."""

    tenant: str
    partition: int
    closed_at: float
    hw: int
    windows: int
    summaries: Summaries
    capped: bool = False  # over the byte limit: later spans are dropped, not judged


def _summaries_json(summaries: Summaries) -> dict[str, Any]:
    return {k: s.to_json() for k, s in summaries.items()}


def _summaries_from(doc: dict[str, Any]) -> Summaries:
    return {k: RuleSummary.from_json(v) for k, v in doc.items()}


def encode_open(trace: OpenTrace) -> bytes:
    head = orjson.dumps(
        {
            "tenant": trace.tenant,
            "first_seen": trace.first_seen,
            "last_seen": trace.last_seen,
            "hw": trace.hw,
            "windows": trace.windows,
            "spans": trace.spans,
            "bytes": trace.bytes,
            "overlap": trace.overlap.num_rows,
            "summaries": _summaries_json(trace.summaries),
        }
    )
    rows = trace.pending()
    body = table_to_ipc(rows.select(SPAN_SCHEMA.names)) if rows.num_rows else b""
    return _MAGIC + _HEAD.pack(len(head)) + head + body


def decode_open(trace_id: str, partition: int, value: bytes) -> OpenTrace:
    if value[:4] != _MAGIC:
        msg = f"not an open-trace checkpoint: {value[:8]!r}"
        raise ValueError(msg)
    (size,) = _HEAD.unpack_from(value, 4)
    head = orjson.loads(value[8 : 8 + size])
    body = value[8 + size :]
    rows = ipc_to_table(body) if body else EMPTY
    n_overlap = int(head["overlap"])
    new = rows.slice(n_overlap)
    return OpenTrace(
        trace_id=trace_id,
        tenant=head["tenant"],
        partition=partition,
        first_seen=float(head["first_seen"]),
        last_seen=float(head["last_seen"]),
        chunks=[new] if new.num_rows else [],
        rows=new.num_rows,
        overlap=rows.slice(0, n_overlap),
        hw=int(head["hw"]),
        windows=int(head["windows"]),
        spans=int(head["spans"]),
        bytes=int(head["bytes"]),
        summaries=_summaries_from(head["summaries"]),
        checkpointed=True,
    )


def encode_decision(decision: Decision) -> bytes:
    return orjson.dumps(
        {
            "tenant": decision.tenant,
            "closed_at": decision.closed_at,
            "hw": decision.hw,
            "windows": decision.windows,
            "capped": decision.capped,
            "summaries": _summaries_json(decision.summaries),
        }
    )


def decode_decision(partition: int, value: bytes) -> Decision:
    doc = orjson.loads(value)
    return Decision(
        tenant=doc["tenant"],
        partition=partition,
        closed_at=float(doc["closed_at"]),
        hw=int(doc["hw"]),
        windows=int(doc["windows"]),
        summaries=_summaries_from(doc["summaries"]),
        capped=bool(doc.get("capped")),
    )
