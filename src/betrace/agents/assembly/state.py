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
import pyarrow.compute as pc

from betrace.agents.assembly.summary import Summaries, summaries_from_json, summaries_json
from betrace.streams.codecs import ipc_to_table, table_to_ipc
from betrace.streams.schemas import SPAN_SCHEMA

_MAGIC = b"BTA1"
_HEAD = struct.Struct(">I")
EMPTY = SPAN_SCHEMA.empty_table()
#: :func:`gather` concatenates slices up to this many runs, or runs of this many rows on average.
_FEW_RUNS = 32
_LONG_RUN = 256
#: ... and when the tables hold more than this many times the rows wanted, up to this many runs.
_SPARSE = 4
_SPARSE_RUNS = 128

#: Rows ``start : start + length`` of a table (usually a whole message): a trace's rows
#: are kept as such references, not as slice tables, so that taking a message and
#: forwarding many traces at once costs no Python object per trace and table.
Piece = tuple[pa.Table, int, int]


def piece(table: pa.Table) -> Piece:
    """All rows of ``table``."""
    return (table, 0, table.num_rows)


def piece_rows(p: Piece) -> pa.Table:
    table, start, length = p
    return table if start == 0 and length == table.num_rows else table.slice(start, length)


def gather(pieces: list[Piece]) -> pa.Table:
    """The rows of ``pieces``, in order, as one contiguous table.

    Concatenating thousands of small slices costs per slice and column, so
    pieces that continue one another in the same table are merged first (a
    message whose traces all close together becomes one slice); when many
    runs remain, the rows are taken by index from the tables at once.
    """
    runs: list[Piece] = []
    last: pa.Table | None = None
    start = end = 0
    for table, s, n in pieces:
        if table is last and s == end:
            end += n
            continue
        if last is not None and end > start:
            runs.append((last, start, end - start))
        last, start, end = table, s, s + n
    if last is not None and end > start:
        runs.append((last, start, end - start))
    if not runs:
        return EMPTY
    total = sum(n for _, _, n in runs)
    if len(runs) <= _FEW_RUNS or total >= _LONG_RUN * len(runs):
        return pa.concat_tables([piece_rows(r) for r in runs]).combine_chunks()
    base: dict[int, int] = {}
    tables: list[pa.Table] = []
    rows = 0
    for table, _, _ in runs:
        if id(table) not in base:
            base[id(table)] = rows
            tables.append(table)
            rows += table.num_rows
    if rows > _SPARSE * total and len(runs) <= _SPARSE_RUNS:
        # A few rows of a few big tables: slices cost less than an index over all rows.
        return pa.concat_tables([piece_rows(r) for r in runs]).combine_chunks()
    # Row i of run r is row i + shift[r] of the concatenated tables.
    offsets, shift, out = [0], [], 0
    for table, s, n in runs:
        shift.append(base[id(table)] + s - out)
        out += n
        offsets.append(out)
    run_of = pc.list_parent_indices(pa.ListArray.from_arrays(pa.array(offsets, pa.int64()), pa.nulls(out)))
    position = pc.subtract(pc.cumulative_sum(pa.repeat(pa.scalar(1, pa.int64()), out)), 1)
    indices = pc.add(position, pc.take(pa.array(shift, pa.int64()), run_of))
    # Taken from the chunked tables: no copy of rows that are not wanted. Concatenating
    # hundreds of slices cost per slice and column (800 runs of 12 rows: 10-12 ms; this, 3 ms).
    return pa.concat_tables(tables).take(indices).combine_chunks()


@dataclass(slots=True)
class OpenTrace:
    """A live trace: the window being filled plus what earlier windows left behind."""

    trace_id: str
    tenant: str
    partition: int
    first_seen: float
    last_seen: float
    chunks: list[Piece] = field(default_factory=list)  # rows not yet in a window, arrival order
    rows: int = 0
    overlap: pa.Table = field(
        default_factory=lambda: EMPTY
    )  # carried rows of the last window: context, never counted again
    held: set[int] = field(default_factory=set)  # message seqs whose rows here are not durable
    dirty_since: float | None = None
    hw: int = -1
    windows: int = 0
    #: Idle, but a ``followed_by`` deadline is still ahead: not closed before this (wall clock).
    hold_until: float = 0.0
    spans: int = 0
    bytes: int = 0
    summaries: Summaries = field(default_factory=dict)
    checkpointed: bool = False
    #: Its root span arrived (only tracked with ``root_close_delay_s`` on; not checkpointed:
    #: a recovered trace waits for the idle timeout, as replayed rows may still come).
    rooted: bool = False

    def pending(self) -> pa.Table:
        """Overlap followed by the new rows (arrival order)."""
        parts = [piece_rows(c) for c in self.chunks]
        if self.overlap.num_rows:
            parts.insert(0, self.overlap)
        if not parts:
            return EMPTY
        return parts[0] if len(parts) == 1 else pa.concat_tables(parts)

    def held_bytes(self, row_bytes: dict[int, float] | None = None) -> int:
        """Bytes of the rows held; a piece of a table counts its share of the table.

        ``row_bytes`` memoises bytes per row by table id across the traces of one
        sum (``nbytes`` walks every buffer; one message backs many traces).
        """
        memo = {} if row_bytes is None else row_bytes
        held = float(self.overlap.nbytes) if self.overlap.num_rows else 0.0
        for table, _, length in self.chunks:
            per_row = memo.get(id(table))
            if per_row is None:
                per_row = memo[id(table)] = table.nbytes / max(table.num_rows, 1)
            held += per_row * length
        return int(held)


class Decision:
    """A closed trace's outcome, remembered for late spans and replay deduplication.

    Decisions stay in the cache for minutes (``decision_cache_s``), and the
    per-rule summary objects of one trace took about three times the bytes of
    their JSON (measured: 6.3 KB against 2.1 KB per trace on the load harness's
    20-rule pack). So a remembered decision keeps the encoded summaries, and
    :attr:`summaries` decodes them again only when they are read (a late span).
    :meth:`compact` drops the objects once nothing in process reads them.
    """

    __slots__ = (
        "_doc",
        "_encoded",
        "_summaries",
        "capped",
        "closed_at",
        "hw",
        "partition",
        "tenant",
        "windows",
    )

    def __init__(  # noqa: PLR0917 - the positional fields of the dataclass it was
        self,
        tenant: str,
        partition: int,
        closed_at: float,
        hw: int,
        windows: int,
        summaries: Summaries | None = None,
        capped: bool = False,  # over the byte limit: later spans are dropped, not judged
        *,
        doc: bytes = b"{}",
    ) -> None:
        self.tenant = tenant
        self.partition = partition
        self.closed_at = closed_at
        self.hw = hw
        self.windows = windows
        self.capped = capped
        self._summaries = summaries
        self._doc = doc  # the JSON of the summaries when ``_summaries`` is None
        self._encoded = summaries is None  # ``_doc`` matches the objects

    @property
    def summaries(self) -> Summaries:
        """The per-rule summaries, to read (see :meth:`summaries_to_change`)."""
        if self._summaries is None:
            self._summaries = summaries_from_json(orjson.loads(self._doc))
        return self._summaries

    def summaries_to_change(self) -> Summaries:
        """The per-rule summaries, to fold late windows into before :meth:`encode`."""
        summaries = self.summaries
        self._encoded = False
        return summaries

    def encode(self) -> bytes:
        """The changelog record; it also becomes what :meth:`compact` keeps."""
        if self._summaries is not None:
            self._doc = _held(summaries_json(self._summaries))
            self._encoded = True
        return orjson.dumps(
            {
                "tenant": self.tenant,
                "closed_at": self.closed_at,
                "hw": self.hw,
                "windows": self.windows,
                "capped": self.capped,
                "summaries": orjson.Fragment(self._doc),
            }
        )

    def compact(self) -> None:
        """Drop the summary objects and keep their JSON (free after :meth:`encode`)."""
        if self._summaries is not None and not self._encoded:
            self._doc = _held(summaries_json(self._summaries))
        self._summaries = None
        self._encoded = True


def _held(doc: dict[str, Any]) -> bytes:
    """``doc`` as JSON in an exactly sized bytes object.

    orjson returns its output buffer as is, several times larger than the JSON
    (measured with orjson 3.13: 16 KiB held for 2 KB of output); decisions are
    kept for minutes, so they keep a copy.
    """
    return memoryview(orjson.dumps(doc)).tobytes()


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
            "summaries": summaries_json(trace.summaries),
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
        chunks=[piece(new)] if new.num_rows else [],
        rows=new.num_rows,
        overlap=rows.slice(0, n_overlap),
        hw=int(head["hw"]),
        windows=int(head["windows"]),
        spans=int(head["spans"]),
        bytes=int(head["bytes"]),
        summaries=summaries_from_json(head["summaries"]),
        checkpointed=True,
    )


def encode_decision(decision: Decision) -> bytes:
    return decision.encode()


def decode_decision(partition: int, value: bytes) -> Decision:
    """A decision from its record, with its summaries left encoded until they are read."""
    doc = orjson.loads(value)
    return Decision(
        tenant=doc["tenant"],
        partition=partition,
        closed_at=float(doc["closed_at"]),
        hw=int(doc["hw"]),
        windows=int(doc["windows"]),
        capped=bool(doc.get("capped")),
        doc=_held(doc["summaries"]),
    )
