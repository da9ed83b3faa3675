"""Wire the stages into one faust app: agents, topics and the assembly timer.

    otlp_spans --ingest--> betrace.spans --assemble--> betrace.traces
        --evaluate--> betrace.signals.pending --signal sink--> betrace.signals
    betrace.spans --span store sink--> DuckDB (one file per tenant)

Each agent takes batches with ``take_events`` and finishes its side effects
(produce, DuckDB write) before the batch is acknowledged; faust flushes the
producer before it commits, so offsets never run ahead of the sinks.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any

import faust
import pyarrow as pa
import pyarrow.compute as pc

from betrace.agents.assemble import TraceAssembler
from betrace.agents.evaluate import EvaluateStage
from betrace.agents.ingest import IngestStage
from betrace.config import Settings
from betrace.errors import DecodeError
from betrace.metrics import InMemoryHooks, StageHooks
from betrace.rules.loader import RuleSet
from betrace.sinks.duckdb_store import SpanStoreSink, TenantStore
from betrace.sinks.signals import SignalSink
from betrace.streams.admin import MAX_MESSAGE_BYTES
from betrace.streams.codecs import dumps, ipc_to_table, loads, table_to_ipc
from betrace.streams.otlp import Record
from betrace.streams.topics import dead_letter_headers, partition_of, verdicts_topic

logger = logging.getLogger(__name__)

#: Soft cap on spans per internal message, to stay well under MAX_MESSAGE_BYTES.
MAX_ROWS_PER_MESSAGE = 20_000


@dataclass
class Pipeline:
    """The faust app and the stage objects behind its agents (for tests and the CLI)."""

    app: faust.App
    ingest: IngestStage
    assembler: TraceAssembler
    evaluate: EvaluateStage
    store: TenantStore
    hooks: StageHooks


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


def _chunks(table: pa.Table, max_rows: int) -> list[pa.Table]:
    """Split by whole traces so that no trace straddles two messages."""
    if table.num_rows <= max_rows:
        return [table]
    k = -(-table.num_rows // max_rows)
    buckets = pa.array([int(t[8:16], 16) % k for t in table.column("trace_id").to_pylist()], pa.int32())
    return [table.filter(pc.equal(buckets, i)) for i in range(k)]


def build_pipeline(settings: Settings, rules: RuleSet, hooks: StageHooks | None = None) -> Pipeline:
    """Create the faust app for ``settings`` with every stage registered."""
    hooks = hooks or InMemoryHooks()
    topics = settings.topics
    app = faust.App(
        settings.app_id,
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

    def topic(name: str) -> Any:
        return app.topic(name, key_type=bytes, value_type=bytes, partitions=None, internal=False)

    input_topic = topic(topics.input)
    spans_topic = topic(topics.spans)
    traces_topic = topic(topics.traces)
    verdicts = topic(verdicts_topic(settings))
    signals_topic = topic(topics.signals)
    dlq_topic = topic(topics.dlq)

    ingest = IngestStage(settings, hooks)
    assembler = TraceAssembler(
        idle_timeout_s=settings.idle_timeout_s,
        max_trace_age_s=settings.max_trace_age_s,
        max_live_traces=settings.max_live_traces,
        hooks=hooks,
    )
    evaluate = EvaluateStage(rules, hooks)
    store = TenantStore(settings.data_dir)
    span_sink = SpanStoreSink(store, max_rows=settings.store_flush_rows * 4, hooks=hooks)

    async def publish(docs: list[dict[str, Any]]) -> None:
        for doc in docs:
            await signals_topic.send(key=doc["signal_id"].encode(), value=dumps(doc))
        # Marking a signal emitted must follow its delivery, not its buffering.
        await app.producer.flush()

    signal_sink = SignalSink(store, publish, max_items=100_000, hooks=hooks)
    batch, wait = settings.batch_max_messages, settings.batch_max_wait_s

    @app.agent(input_topic, name="betrace.ingest")
    async def ingest_agent(stream: Any) -> None:
        async for events in stream.take_events(batch, within=wait):
            result = ingest.process([_record(e) for e in events])
            for dead in result.dead_letters:
                await dlq_topic.send(
                    key=dead.record.key, value=dead.record.value, headers=dead_letter_headers(dead)
                )
            for partition, table in result.partitions:
                for chunk in _chunks(table, MAX_ROWS_PER_MESSAGE):
                    await spans_topic.send(value=table_to_ipc(chunk), partition=partition)

    held: dict[int, Any] = {}
    seqs = itertools.count()

    @app.agent(spans_topic, name="betrace.assemble")
    async def assemble_agent(stream: Any) -> None:
        async for events in stream.take_events(batch, within=wait):
            for event in events:
                try:
                    table = ipc_to_table(event.message.value)
                except DecodeError as exc:
                    logger.error("assemble: skipping corrupt internal batch at offset %s: %s", event.message.offset, exc)
                    continue
                seq = next(seqs)
                # Hold the message un-acked until all its traces are closed and forwarded.
                event.message.incref()
                held[seq] = event
                assembler.add(table, seq)

    @app.timer(min(0.25, settings.idle_timeout_s / 4), name="betrace.assemble.close")
    async def close_traces() -> None:
        closed = assembler.close_due()
        if closed is None:
            return
        if closed.spans.num_rows:
            parts = pa.array(partition_of(closed.spans.column("trace_id").to_pylist(), topics.partitions))
            for p in range(topics.partitions):
                part = closed.spans.filter(pc.equal(parts, p))
                if part.num_rows:
                    for chunk in _chunks(part, MAX_ROWS_PER_MESSAGE):
                        await traces_topic.send(value=table_to_ipc(chunk), partition=p)
        for seq in closed.released:
            event = held.pop(seq, None)
            if event is not None:
                event.ack()

    @app.agent(traces_topic, name="betrace.evaluate")
    async def evaluate_agent(stream: Any) -> None:
        async for events in stream.take_events(batch, within=wait):
            tables = []
            for event in events:
                try:
                    tables.append(ipc_to_table(event.message.value))
                except DecodeError as exc:
                    logger.error("evaluate: skipping corrupt internal batch: %s", exc)
            if tables:
                for doc in evaluate.evaluate(pa.concat_tables(tables)):
                    await verdicts.send(key=doc["signal_id"].encode(), value=dumps(doc))

    @app.agent(verdicts, name="betrace.sink.signals")
    async def signal_agent(stream: Any) -> None:
        async for events in stream.take_events(batch, within=wait):
            for event in events:
                try:
                    signal_sink.add(loads(event.message.value))
                except DecodeError as exc:
                    logger.error("signal sink: skipping corrupt candidate: %s", exc)
            await signal_sink.flush()

    @app.agent(spans_topic, name="betrace.sink.duckdb")
    async def store_agent(stream: Any) -> None:
        async for events in stream.take_events(batch, within=wait):
            for event in events:
                try:
                    table = ipc_to_table(event.message.value)
                except DecodeError as exc:
                    logger.error("span store: skipping corrupt internal batch: %s", exc)
                    continue
                if span_sink.full:
                    await span_sink.flush()
                span_sink.add(table, size=table.num_rows)
            await span_sink.flush()

    return Pipeline(app=app, ingest=ingest, assembler=assembler, evaluate=evaluate, store=store, hooks=hooks)
