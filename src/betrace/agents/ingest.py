"""Ingest stage: decode OTLP, validate, drop exact duplicates, repartition by trace id."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from betrace.config import Settings
from betrace.metrics import StageHooks
from betrace.streams.otlp import DeadLetter, OtlpDecoder, Record
from betrace.streams.topics import split_by_partition

logger = logging.getLogger(__name__)

STEP_ID = "ingest"


class DedupeCache:
    """Recently seen span versions, bounded in memory.

    The key is ``tenant/trace_id/span_id/start/end/status``: an exact replay is
    dropped, while a newer version of a span (a later end time, another
    status) or a conflicting one (another start) passes on to the span store,
    which upserts it, and to the integrity checks.

    Two generations: when the young one fills, the old one is dropped. A key
    is remembered for between ``capacity/2`` and ``capacity`` inserts. The
    sinks stay idempotent on their own; this only saves them the work.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._young: set[str] = set()
        self._old: set[str] = set()

    def __len__(self) -> int:
        return len(self._young) + len(self._old)

    def fresh_mask(self, keys: Sequence[str]) -> list[bool]:
        """True for keys not seen before (also within ``keys``); remembers them."""
        if self.capacity == 0:
            return [True] * len(keys)
        young, old = self._young, self._old
        mask = []
        for key in keys:
            if key in young or key in old:
                mask.append(False)
            else:
                young.add(key)
                mask.append(True)
        if len(young) >= self.capacity // 2:
            self._old, self._young = young, set()
        return mask


@dataclass(slots=True)
class IngestTotals:
    """What this stage saw since start: the ingestion run of a worker session reads it."""

    messages: int = 0
    spans: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    forwarded: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    #: Where the latest dead letters came from (topic[partition]@offset: reason), newest last.
    samples: list[str] = field(default_factory=list)


@dataclass(slots=True)
class IngestResult:
    partitions: list[tuple[int, pa.Table]] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    spans: int = 0
    duplicates: int = 0


class IngestStage:
    """Pure ingest logic; the faust agent only moves bytes in and out."""

    step_id = STEP_ID

    def __init__(self, settings: Settings, hooks: StageHooks) -> None:
        self.decoder = OtlpDecoder(
            encoding=settings.topics.input_encoding,
            tenant_header=settings.tenant_header,
            default_tenant=settings.default_tenant,
        )
        self.partitions = settings.topics.partitions
        self.dedupe = DedupeCache(settings.dedupe_cache_size)
        self.hooks = hooks
        self.totals = IngestTotals()

    def dedupe_table(self, table: pa.Table) -> pa.Table:
        """Drop span versions seen recently (vectorised key building, one set lookup per span)."""
        if not table.num_rows:
            return table
        keys = pc.binary_join_element_wise(
            table.column("tenant"),
            table.column("trace_id"),
            table.column("span_id"),
            pc.cast(table.column("start_ns"), pa.string()),
            pc.cast(table.column("end_ns"), pa.string()),
            pc.cast(table.column("status_code"), pa.string()),
            "/",
        ).to_pylist()
        return table.filter(pa.array(self.dedupe.fresh_mask(keys), pa.bool_()))

    def process(self, records: Sequence[Record]) -> IngestResult:
        decoded = self.decoder.decode(records)
        table = decoded.spans
        result = IngestResult(dead_letters=decoded.dead_letters)
        self.hooks.count("betrace_records_in_total", len(records), stage=STEP_ID)
        self.hooks.count("betrace_spans_in_total", table.num_rows, stage=STEP_ID)
        for dead in decoded.dead_letters:
            self.hooks.count("betrace_dead_letters_total", stage=STEP_ID, reason=dead.reason)
            logger.warning(
                "dead letter from %s[%d]@%d: %s: %s",
                dead.record.topic,
                dead.record.partition,
                dead.record.offset,
                dead.reason,
                dead.detail[:300],
            )
        totals = self.totals
        totals.messages += len(records)
        totals.spans += table.num_rows
        for dead in decoded.dead_letters:
            totals.dead_letters += 1
            totals.reasons[dead.reason] = totals.reasons.get(dead.reason, 0) + 1
            rec = dead.record
            totals.samples.append(f"{rec.topic}[{rec.partition}]@{rec.offset}: {dead.reason}")
        del totals.samples[:-20]
        if table.num_rows:
            fresh = self.dedupe_table(table)
            result.duplicates = table.num_rows - fresh.num_rows
            totals.duplicates += result.duplicates
            if result.duplicates:
                self.hooks.count("betrace_duplicates_total", result.duplicates, stage=STEP_ID)
            table = fresh
        result.spans = table.num_rows
        totals.forwarded += table.num_rows
        result.partitions = split_by_partition(table, self.partitions)
        self.hooks.count("betrace_spans_out_total", table.num_rows, stage=STEP_ID)
        return result
