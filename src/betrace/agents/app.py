"""Wire the stages into one faust app: agents, topics and the assembly timer.

    otlp_spans --ingest--> betrace.spans --assemble--> betrace.traces
        --evaluate--> betrace.signals.pending --signal sink--> betrace.signals
    betrace.spans --span store sink--> DuckDB (one file per tenant)

Each agent takes batches with ``take_events`` and finishes its side effects
(produce, DuckDB write) before the batch is acknowledged; faust flushes the
producer before it commits, so offsets never run ahead of the sinks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any, cast

import faust
import pyarrow as pa
import pyarrow.compute as pc

from betrace.agents.assemble import DECISIONS_TABLE, TRACES_TABLE, ClosedTraces, TraceAssembler
from betrace.agents.evaluate import EvaluateStage
from betrace.agents.ingest import IngestStage
from betrace.config import Settings
from betrace.errors import DecodeError
from betrace.metrics import InMemoryHooks, StageHooks
from betrace.rules.loader import RuleSource
from betrace.sinks.duckdb_store import SpanStoreSink, TenantStore
from betrace.sinks.ledger import SignalLedger, open_ledger
from betrace.sinks.signals import SignalSink
from betrace.streams.admin import MAX_MESSAGE_BYTES
from betrace.streams.codecs import dumps, ipc_to_table, loads, table_to_ipc
from betrace.streams.otlp import Record
from betrace.streams.topics import (
    DLQ_DETAIL,
    DLQ_OFFSET,
    DLQ_PARTITION,
    DLQ_REASON,
    DLQ_TOPIC,
    dead_letter_headers,
    partition_column,
    verdicts_topic,
)

logger = logging.getLogger(__name__)

#: Soft cap on spans per internal message, to stay well under MAX_MESSAGE_BYTES.
MAX_ROWS_PER_MESSAGE = 20_000


def _record(event: Any) -> Record:
    msg = event.message
    headers = msg.headers or ()
    if isinstance(headers, dict):
        headers = list(headers.items())
    return Record(
        value=msg.value,
        key=msg.key,
        headers=[(k, v or b"") for k, v in headers],
        timestamp_ms=int(msg.timestamp * 1000),
        topic=msg.topic,
        partition=msg.partition,
        offset=msg.offset,
    )


def chunk_by_trace(table: pa.Table, max_rows: int) -> list[pa.Table]:
    """Split by whole traces so that no trace straddles two messages."""
    if table.num_rows <= max_rows:
        return [table]
    k = -(-table.num_rows // max_rows)
    encoded = pc.dictionary_encode(table.column("trace_id").combine_chunks())
    per_trace = pa.array([i % k for i in range(len(encoded.dictionary))], pa.int32())
    buckets = pc.take(per_trace, encoded.indices)
    return [table.filter(pc.equal(buckets, i)) for i in range(k)]


def _tables(events: list[Any], step: str) -> list[tuple[Any, pa.Table]]:
    """Decode internal Arrow messages; a corrupt one is logged and skipped, never fatal."""
    out = []
    for event in events:
        try:
            out.append((event, ipc_to_table(event.message.value)))
        except DecodeError as exc:
            logger.warning(
                "%s: skipping corrupt internal batch at offset %s: %s", step, event.message.offset, exc
            )
    return out


class Pipeline:
    """The faust app and the stage objects behind its agents."""

    def __init__(self, settings: Settings, rules: RuleSource, hooks: StageHooks | None = None) -> None:
        self.settings = settings
        self.hooks = hooks or InMemoryHooks()
        topics = settings.topics
        self.upstream = settings.stages in ("all", "ingest")
        self.downstream = settings.stages in ("all", "downstream")
        self.app = faust.App(
            settings.group_id,
            broker=settings.broker_url,
            key_serializer="raw",
            value_serializer="raw",
            store="memory://",
            autodiscover=False,
            web_enabled=settings.web_port > 0,
            web_port=settings.web_port or 6066,
            web_bind="127.0.0.1",
            topic_partitions=topics.partitions,
            topic_replication_factor=topics.replication_factor,
            consumer_auto_offset_reset="earliest",
            broker_commit_interval=1.0,
            producer_max_request_size=MAX_MESSAGE_BYTES,
            consumer_max_fetch_size=MAX_MESSAGE_BYTES,
            producer_linger=0.005,
            producer_acks=-1,
            stream_wait_empty=False,
        )
        self.input_topic = self._topic(topics.input)
        self.spans_topic = self._topic(topics.spans)
        self.traces_topic = self._topic(topics.traces)
        self.verdicts_topic = self._topic(verdicts_topic(settings))
        self.signals_topic = self._topic(topics.signals)
        self.dlq_topic = self._topic(topics.dlq)

        self.ingest = IngestStage(settings, self.hooks)
        self.assembler = TraceAssembler(
            idle_timeout_s=settings.idle_timeout_s,
            max_trace_age_s=settings.max_trace_age_s,
            max_live_traces=settings.max_live_traces,
            hooks=self.hooks,
            policy=settings.assembly_policy,
            # Through the rule source, so that a reloaded rule set is seen at the next window.
            rules_for=lambda tenant: rules.current().for_tenant(tenant),
            checkpoint_interval_s=settings.checkpoint_interval_s,
            decision_cache_max=settings.decision_cache_max_traces,
            partitions=topics.partitions,
        )
        # Assembly state: changelog topics on Kafka, co-partitioned with betrace.spans
        # (entries are written to their trace's partition, see assembly/state.py).
        # An ingest-only worker must not recover (or own) assembly state.
        self.state_tables = {
            name: self.app.Table(
                name,
                partitions=topics.partitions,
                key_type=bytes,
                value_type=bytes,
                on_recover=self._restore_state,
            )
            for name in ((TRACES_TABLE, DECISIONS_TABLE) if self.downstream else ())
        }
        self._held_partition: dict[int, int] = {}
        self.evaluate = EvaluateStage(rules, self.hooks)
        self.store = TenantStore(settings.data_dir)
        self.span_sink = SpanStoreSink(self.store, max_rows=settings.store_flush_rows, hooks=self.hooks)
        # Only the downstream worker owns the ledger file (DuckDB allows one writer).
        self.ledger = (
            SignalLedger(
                open_ledger(
                    settings.data_dir,
                    settings.tigerbeetle_addresses,
                    cluster_id=settings.tigerbeetle_cluster_id,
                ),
                hooks=self.hooks,
                flush_items=settings.ledger_flush_items,
                flush_interval_s=settings.ledger_flush_interval_s,
            )
            if self.downstream
            else None
        )
        self.signal_sink = SignalSink(
            self.store, self._publish, max_items=100_000, hooks=self.hooks, ledger=self.ledger
        )
        self._held: dict[int, Any] = {}
        self._seqs = itertools.count()
        self._register()

    def _topic(self, name: str) -> Any:
        return self.app.topic(name, key_type=bytes, value_type=bytes, partitions=None, internal=False)

    def _register(self) -> None:
        batch, wait = self.settings.batch_max_messages, self.settings.batch_max_wait_s

        def agent(topic: Any, name: str, handle: Any) -> None:
            async def run(stream: Any) -> None:
                async for events in stream.take_events(batch, within=wait):
                    self.hooks.observe("betrace_batch_size", len(events), stage=name.removeprefix("betrace."))
                    # Side effects complete before take_events acks the batch.
                    await handle(events)

            self.app.agent(topic, name=name)(run)

        if self.upstream:
            agent(self.input_topic, "betrace.ingest", self._on_input)
        if not self.downstream:
            return
        agent(self.spans_topic, "betrace.assemble", self._on_spans)
        agent(self.spans_topic, "betrace.sink.duckdb", self._on_spans_store)
        agent(self.traces_topic, "betrace.evaluate", self._on_traces)
        agent(self.verdicts_topic, "betrace.sink.signals", self._on_verdicts)
        interval = min(0.25, self.settings.idle_timeout_s / 4)
        self.app.timer(interval, name="betrace.assemble.close")(self.close_traces)
        if self.ledger is not None:
            flush = self.settings.ledger_flush_interval_s
            self.app.timer(flush, name="betrace.ledger.flush")(self.ledger.sink.flush_if_due)
        self.app.on_partitions_revoked.connect(cast(Any, self._on_revoked))  # mode signal typing

    async def _on_input(self, events: list[Any]) -> None:
        result = self.ingest.process([_record(e) for e in events])
        for dead in result.dead_letters:
            await self.dlq_topic.send(
                key=dead.record.key, value=dead.record.value, headers=dead_letter_headers(dead)
            )
        for partition, table in result.partitions:
            for chunk in chunk_by_trace(table, MAX_ROWS_PER_MESSAGE):
                await self.spans_topic.send(value=table_to_ipc(chunk), partition=partition)

    async def _on_spans(self, events: list[Any]) -> None:
        for event, table in _tables(events, "assemble"):
            seq = next(self._seqs)
            # Hold the message un-acked until all its traces are closed and forwarded.
            event.message.incref()
            self._held[seq] = event
            self._held_partition[seq] = event.message.partition
            self.assembler.add(table, seq, partition=event.message.partition, offset=event.message.offset)

    async def close_traces(self) -> None:
        """Forward what is due, save the state, then release the messages it came from.

        Order matters for exactly-once effects: traces and signals are delivered
        before the state that says they were (a crash in between re-closes the
        trace and the sinks drop the duplicates), and the state is delivered
        before the input messages are acknowledged.
        """
        closed = self.assembler.close_due()
        if closed is None:
            return
        await asyncio.gather(*await self._emit(closed))
        await asyncio.gather(
            *[
                await self.state_tables[w.table].changelog_topic.send(
                    key=w.key.encode(), value=w.value, partition=w.partition
                )
                for w in closed.writes
            ]
        )
        for seq in closed.released:
            event = self._held.pop(seq, None)
            self._held_partition.pop(seq, None)
            if event is not None:
                event.ack()

    async def _emit(self, closed: ClosedTraces) -> list[Any]:
        pending = []
        spans = closed.spans
        if spans.num_rows:
            partitions = self.settings.topics.partitions
            parts = partition_column(spans.column("trace_id"), partitions)
            for p in pc.unique(parts).to_pylist():
                for chunk in chunk_by_trace(spans.filter(pc.equal(parts, p)), MAX_ROWS_PER_MESSAGE):
                    pending.append(await self.traces_topic.send(value=table_to_ipc(chunk), partition=p))
        for doc in closed.signals:
            pending.append(await self.verdicts_topic.send(key=doc["signal_id"].encode(), value=dumps(doc)))
        for dropped in closed.dropped:
            headers = [
                (DLQ_REASON, dropped.reason.encode()),
                (
                    DLQ_DETAIL,
                    f"tenant={dropped.tenant} trace_id={dropped.trace_id} {dropped.detail}".encode(),
                ),
                (DLQ_TOPIC, self.settings.topics.spans.encode()),
                (DLQ_PARTITION, b"-1"),
                (DLQ_OFFSET, b"-1"),
            ]
            for chunk in chunk_by_trace(dropped.spans, MAX_ROWS_PER_MESSAGE):
                value = table_to_ipc(chunk)
                pending.append(
                    await self.dlq_topic.send(key=dropped.trace_id.encode(), value=value, headers=headers)
                )
            self.hooks.count("betrace_dead_letters_total", stage="assemble", reason=dropped.reason)
        return pending

    async def _restore_state(self) -> None:
        """After recovery: load the recovered assembly state, then drop the raw copy."""
        restored = 0
        for name, table in self.state_tables.items():
            store = table.data
            for key, value in list(store.items()):
                if value is not None:
                    self.assembler.restore(name, bytes(key).decode(), bytes(value))
                    restored += 1
            store.clear()
        if restored:
            logger.info("assemble: restored %d assembly state entries from the changelog", restored)

    async def _on_revoked(self, sender: Any, *args: Any, signal: Any = None, **kwargs: Any) -> None:
        """Revoked partitions: their new owner recovers the state and replays the input."""
        del sender, signal
        revoked = args[0] if args else kwargs.get("revoked", ())
        spans = {tp.partition for tp in revoked if tp.topic == self.settings.topics.spans}
        if not spans:
            return
        for seq in self.assembler.drop_partitions(spans):
            self._held.pop(seq, None)
            self._held_partition.pop(seq, None)
        logger.info("assemble: partitions %s revoked; their open traces were dropped", sorted(spans))

    async def _on_spans_store(self, events: list[Any]) -> None:
        for _, table in _tables(events, "span store"):
            if self.span_sink.full:
                await self.span_sink.flush()
            self.span_sink.add(table, size=table.num_rows)
        await self.span_sink.flush()

    async def _on_traces(self, events: list[Any]) -> None:
        tables = [table for _, table in _tables(events, "evaluate")]
        if not tables:
            return
        for doc in self.evaluate.evaluate(pa.concat_tables(tables)):
            await self.verdicts_topic.send(key=doc["signal_id"].encode(), value=dumps(doc))

    async def _on_verdicts(self, events: list[Any]) -> None:
        for event in events:
            try:
                self.signal_sink.add(loads(event.message.value))
            except DecodeError as exc:
                logger.warning("signal sink: skipping a corrupt candidate signal: %s", exc)
        await self.signal_sink.flush()

    async def _publish(self, docs: list[dict[str, Any]]) -> None:
        pending = [
            await self.signals_topic.send(key=doc["signal_id"].encode(), value=dumps(doc)) for doc in docs
        ]
        # Marking a signal emitted must follow its delivery, not its buffering; waiting on
        # these records alone keeps the sink off the rest of the producer's traffic.
        await asyncio.gather(*pending)
        now_ms = time.time() * 1000
        for doc in docs:
            if doc.get("source_produced_ms"):
                latency = max(now_ms - doc["source_produced_ms"], 0.0) / 1000
                self.hooks.observe("betrace_produce_to_signal_seconds", latency, tenant=doc["tenant"])


def build_pipeline(settings: Settings, rules: RuleSource, hooks: StageHooks | None = None) -> Pipeline:
    """Create the faust app for ``settings`` with every stage registered."""
    return Pipeline(settings, rules, hooks)
