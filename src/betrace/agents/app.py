"""Wire the stages into one faust app: agents, topics and the assembly timer.

    otlp_spans --ingest--> betrace.spans --assemble--> betrace.traces
        --evaluate--> betrace.signals.pending --signal sink--> betrace.signals
    otlp_spans --ingest--> betrace.store --span store sink--> DuckDB (one file per tenant)

``betrace.spans`` and ``betrace.traces`` are partitioned by trace id;
``betrace.store`` and ``betrace.signals.pending`` by tenant, so the worker
holding partition p of both owns the files of every tenant hashing to p
(see :meth:`Pipeline._on_assigned` and docs/architecture.md).

Each agent takes batches with ``take_events`` and finishes its side effects
(produce, DuckDB write) before the batch is acknowledged; faust flushes the
producer before it commits, so offsets never run ahead of the sinks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, cast

import faust
import pyarrow as pa
import pyarrow.compute as pc
from faust.types import TP

from betrace.agents.assemble import DECISIONS_TABLE, TRACES_TABLE, ClosedTraces, TraceAssembler
from betrace.agents.evaluate import EvaluateStage
from betrace.agents.ingest import IngestStage
from betrace.audit.events import AuditRecorder, NullAuditRecorder
from betrace.audit.session import WorkerSession
from betrace.config import Settings
from betrace.errors import BetraceError, DecodeError
from betrace.integrity.sink import IntegritySink
from betrace.metrics import InMemoryHooks, StageHooks
from betrace.resilience.breakers import RULES, BreakerRegistry
from betrace.resilience.wiring import Resilience
from betrace.rules.loader import RuleSource
from betrace.sinks.base import RowWatermarks
from betrace.sinks.duckdb_store import SpanStoreSink, TenantStore
from betrace.sinks.ledger import TenantLedgers, open_ledger
from betrace.sinks.signals import SignalSink
from betrace.streams.admin import MAX_MESSAGE_BYTES
from betrace.streams.codecs import dumps, ipc_to_table, loads, table_to_ipc
from betrace.streams.otlp import Record
from betrace.streams.published import published_keys
from betrace.streams.topics import (
    DLQ_DETAIL,
    DLQ_OFFSET,
    DLQ_PARTITION,
    DLQ_REASON,
    DLQ_TOPIC,
    dead_letter_headers,
    partition_column,
    split_by_tenant,
    tenant_partition,
    tenant_rows,
    verdicts_topic,
)
from betrace.streams.transport import install as install_transport

if TYPE_CHECKING:
    from betrace.cache.tier import CacheTier
    from betrace.cache.traces import TraceMetaCache

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

    def __init__(
        self,
        settings: Settings,
        rules: RuleSource,
        hooks: StageHooks | None = None,
        *,
        audit: AuditRecorder | None = None,
        breakers: BreakerRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.hooks = hooks or InMemoryHooks()
        self.rules = rules
        # Breakers, spools, backpressure and rule quarantine (issue 7, docs/reliability.md).
        self.resilience = Resilience.build(settings, hooks=self.hooks, audit=audit, breakers=breakers)
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
            # faust's own directory (table state; empty with the memory store): with the data,
            # not "<app id>-data" in whatever directory the worker was started from.
            datadir=str(settings.data_dir / "faust"),
        )
        # No skipped never-committed partitions, no duplicates from producer retries (streams/transport.py).
        install_transport(self.app)
        self.input_topic = self._topic(topics.input)
        self.spans_topic = self._topic(topics.spans)
        self.traces_topic = self._topic(topics.traces)
        self.store_topic = self._topic(topics.store)
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
            rules_for=lambda tenant: self.resilience.quarantine.allowed(rules.current().for_tenant(tenant)),
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
                # A long trace's entry carries its structural trees (assembly/tree.py): up to
                # ~360 KB per structural rule, past the broker's 1 MB default.
                extra_topic_configs={"max.message.bytes": str(MAX_MESSAGE_BYTES)},
            )
            for name in ((TRACES_TABLE, DECISIONS_TABLE) if self.downstream else ())
        }
        self._held_partition: dict[int, int] = {}
        self.audit: AuditRecorder = audit or NullAuditRecorder()
        self.evaluate = EvaluateStage(rules, self.hooks, audit=self.audit)
        #: worker.started / worker.stopped of this process (recorded by the worker).
        self.session = WorkerSession(self.audit, settings)
        self.store = TenantStore(
            settings.data_dir,
            checkpoint_mib=settings.store_checkpoint_mib,
            memory_mib=settings.store_memory_mib,
        )
        if self.downstream:  # several downstream workers: each writes only the tenants it owns
            self.store.track_ownership(topics.partitions)
        #: Held while a sink batch writes tenant files; a revocation waits for both. One per
        #: sink, so that signals are not stuck behind a long span flush (many tenants).
        self._spans_lock = asyncio.Lock()
        self._signals_lock = asyncio.Lock()
        #: betrace.store events whose spans wait in the span sink: acknowledged once stored.
        self._store_held: RowWatermarks[Any] = RowWatermarks()
        self.span_sink = SpanStoreSink(self.store, max_rows=settings.store_flush_rows, hooks=self.hooks)
        integrity = settings.integrity
        self.integrity = IntegritySink(
            self.store,
            skew_ms=integrity.clock_skew_ms,
            max_spans=integrity.max_buffered_spans,
            hooks=self.hooks,
        )
        # Downstream only; the embedded ledger is one file per tenant, opened by its owner.
        addresses = settings.tigerbeetle_addresses
        self.ledger = (
            TenantLedgers(
                settings.data_dir,
                hooks=self.hooks,
                flush_items=settings.ledger_flush_items,
                flush_interval_s=settings.ledger_flush_interval_s,
                shared=(
                    open_ledger(settings.data_dir, addresses, cluster_id=settings.tigerbeetle_cluster_id)
                    if addresses
                    else None
                ),
                owns=self.store.owns,
                files=self.store.files,  # one DuckDB instance for every tenant file of the worker
            )
            if self.downstream
            else None
        )
        self.signal_sink = SignalSink(
            self.store,
            self._publish,
            max_items=100_000,
            hooks=self.hooks,
            ledger=self.ledger,
            audit=self.audit,
            fence=self._published_already,
        )
        if self.downstream:
            self.resilience.guard_span_sink(self.span_sink, [topics.store])
            self.resilience.guard_signal_sink(self.signal_sink, [verdicts_topic(settings)])
            self.resilience.backpressure.register(
                "breaker.rules", self.resilience.rules_breaker_level, [topics.traces]
            )
            self.evaluate.quarantine = self.resilience.quarantine
        self._held: dict[int, Any] = {}
        self._seqs = itertools.count()
        #: The Redis cache tier and the trace metadata shared across workers (set by the worker).
        self.cache: CacheTier | None = None
        self.trace_meta: TraceMetaCache | None = None
        # Trace metadata is looked up only while local decisions may be incomplete: for one
        # decision window after start / recovery, and after the cap forgot decisions early.
        windows = [o.decision_cache_s for o in settings.assembly_tenants.values()]
        self._decision_window_s = max([settings.decision_cache_s, *(w for w in windows if w is not None)])
        self._meta_lookups_until = time.time() + self._decision_window_s
        self._register()

    def _topic(self, name: str) -> Any:
        return self.app.topic(name, key_type=bytes, value_type=bytes, partitions=None, internal=False)

    def _register(self) -> None:
        batch, wait = self.settings.batch_max_messages, self.settings.batch_max_wait_s

        def agent(topic: Any, name: str, handle: Any) -> None:
            async def run(stream: Any) -> None:
                async for events in stream.take_events(batch, within=wait):
                    self.hooks.observe("betrace_batch_size", len(events), stage=name.removeprefix("betrace."))
                    # take_events acks a batch in a ``finally``: also when the handler raised
                    # or was cancelled (a shutdown mid-write), and the offsets would then be
                    # committed for work never done. A reference of ours, dropped only once
                    # the handler returned, keeps such a batch unacknowledged: replayed.
                    for event in events:
                        event.message.incref()
                    await handle(events)
                    for event in events:
                        event.ack()

            self.app.agent(topic, name=name)(run)

        if self.upstream:
            agent(self.input_topic, "betrace.ingest", self._on_input)
        if not self.downstream:
            return
        agent(self.spans_topic, "betrace.assemble", self._on_spans)
        agent(self.store_topic, "betrace.sink.duckdb", self._on_spans_store)
        agent(self.traces_topic, "betrace.evaluate", self._on_traces)
        agent(self.verdicts_topic, "betrace.sink.signals", self._on_verdicts)
        self.app.timer(close_tick_s(self.settings), name="betrace.assemble.close")(self.close_traces)
        self.app.timer(1.0, name="betrace.integrity.flush")(self.integrity.flush_quietly)
        store_tick = min(0.25, self.settings.store_flush_interval_s / 2)
        self.app.timer(store_tick, name="betrace.sink.duckdb.flush")(self.flush_spans_if_due)
        if self.settings.integrity.recheck_interval_s > 0:
            lookback = self.settings.integrity.recheck_lookback_s
            self.app.timer(self.settings.integrity.recheck_interval_s, name="betrace.integrity.recheck")(
                lambda: self.integrity.recheck(lookback)
            )
        if self.ledger is not None:
            flush = self.settings.ledger_flush_interval_s
            self.app.timer(flush, name="betrace.ledger.flush")(self.ledger.flush_if_due)
        self.app.on_partitions_revoked.connect(cast(Any, self._on_revoked))  # mode signal typing
        self.app.on_partitions_assigned.connect(cast(Any, self._on_assigned))
        self.app.timer(0.5, name="betrace.resilience")(self._resilience_tick)

    async def _resilience_tick(self) -> None:
        await self.resilience.tick(self.app.consumer, self.rules)

    async def _on_input(self, events: list[Any]) -> None:
        result = self.ingest.process([_record(e) for e in events])
        for dead in result.dead_letters:
            await self.dlq_topic.send(
                key=dead.record.key, value=dead.record.value, headers=dead_letter_headers(dead)
            )
        for partition, table in result.partitions:
            for chunk in chunk_by_trace(table, MAX_ROWS_PER_MESSAGE):
                await self.spans_topic.send(value=table_to_ipc(chunk), partition=partition)
        # The same spans again, by tenant, for the span store's owner (measured: docs/architecture.md).
        tables = [table for _, table in result.partitions]
        if tables:
            partitions = self.settings.topics.partitions
            for tenant, table in split_by_tenant(pa.concat_tables(tables)):
                for chunk in chunk_by_trace(table, MAX_ROWS_PER_MESSAGE):
                    await self.store_topic.send(
                        value=table_to_ipc(chunk), partition=tenant_partition(tenant, partitions)
                    )

    async def _on_spans(self, events: list[Any]) -> None:
        tables = _tables(events, "assemble")
        if self.trace_meta is not None and tables and self._meta_lookups_wanted():
            # One MGET per batch: traces this worker does not know may have been decided elsewhere.
            unknown = self.assembler.unknown_traces([table for _, table in tables])
            if unknown:
                for trace_id, decision in (await self.trace_meta.lookup(unknown)).items():
                    self.assembler.restore(DECISIONS_TABLE, trace_id, decision)
        for event, table in tables:
            seq = next(self._seqs)
            # Hold the message un-acked until all its traces are closed and forwarded.
            event.message.incref()
            self._held[seq] = event
            self._held_partition[seq] = event.message.partition
            self.assembler.add(table, seq, partition=event.message.partition, offset=event.message.offset)

    def _meta_lookups_wanted(self) -> bool:
        now = time.time()
        evicted = self.assembler.evicted_at
        if evicted is not None and evicted > now - self._decision_window_s:
            # A forgotten decision may still be in Redis (its TTL ends with the window).
            self._meta_lookups_until = max(self._meta_lookups_until, evicted + self._decision_window_s)
        return now < self._meta_lookups_until

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
        if self.trace_meta is not None and self.cache is not None:
            writes = [w for w in closed.writes if w.table == DECISIONS_TABLE and w.value]
            if writes:  # after the changelog: Redis never knows more than the source of truth
                decided = {w.key: w.value for w in writes if w.value}
                decoded = {w.key: w.decision for w in writes if w.decision is not None}
                self.cache.spawn(self.trace_meta.write_through(decided, decoded), cache="trace_meta")
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
        self.evaluate.annotate(closed.signals, source="assemble")  # sequence deadlines, late spans
        for doc in closed.signals:
            pending.append(await self._send_verdict(doc))
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
        # New partitions (a rebalance): their late spans may find their decisions in Redis.
        self._meta_lookups_until = time.time() + self._decision_window_s
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
        await self._release_tenants(revoked)
        spans = {tp.partition for tp in revoked if tp.topic == self.settings.topics.spans}
        if not spans:
            return
        for seq in self.assembler.drop_partitions(spans):
            self._held.pop(seq, None)
            self._held_partition.pop(seq, None)
        self._recover_in_full(spans)
        logger.info("assemble: partitions %s revoked; their open traces were dropped", sorted(spans))

    def _recover_in_full(self, partitions: set[int]) -> None:
        """Make the next recovery read the state changelogs of ``partitions`` from the start.

        Their state was just dropped, but a partition this worker gets back (every one, in
        an eager rebalance, when it keeps its partitions) is recovered by faust only from
        the changelog offset it last read, so its decisions and checkpointed open traces
        would be lost for good: replayed input counted again, late spans judged as new traces.
        """
        recovery = cast(Any, self.app.tables).recovery
        for table in self.state_tables.values():
            topic = table.changelog_topic.get_topic_name()
            for partition in partitions:
                recovery.revoke(TP(topic, partition))

    def _owned_events(self, events: list[Any]) -> list[Any]:
        """Events of partitions this worker still owns; the rest belong to the new owner.

        A batch taken before a revocation may still hold them: skipping them
        is safe, their offsets are not committed here, the new owner reads them.
        """
        owned = self.store.owned_partitions
        kept = []
        for event in events:
            if event.message.partition in owned:
                kept.append(event)
            else:
                # Never acknowledged here: at shutdown (every tenant released) or between a
                # revocation and the next assignment faust still counts the partition as
                # ours and would commit past it, losing it for the next owner too.
                event.message.incref()
        if len(kept) < len(events):
            logger.info("store: skipped %d events of partitions now owned elsewhere", len(events) - len(kept))
        return kept

    async def _on_spans_store(self, events: list[Any]) -> None:
        """Buffer spans across batches, up to ``store_flush_rows`` or ``store_flush_interval_s``.

        Each flush is one transaction per tenant, with a fixed cost of ~10 ms each (measured:
        benchmarks/RESULTS.md), so flushing every batch of a worker with hundreds of tenants
        would write a few spans per transaction and fall behind. The events stay
        unacknowledged until their spans are stored, so offsets never pass the sink.
        """
        async with self._spans_lock:
            for event, table in _tables(self._owned_events(events), "span store"):
                if self.span_sink.full:
                    await self._flush_spans(aligned=True)
                event.message.incref()
                self._store_held.hold(event, tenant_rows(table))
                self.span_sink.add(table, size=table.num_rows)
            if self.span_sink.due(self.settings.store_flush_interval_s):
                await self._flush_spans(aligned=self.span_sink.full)

    async def _flush_spans(self, *, aligned: bool = False) -> None:
        """Flush the span sink, then acknowledge the events whose spans are all stored (not on
        failure: replayed). ``aligned`` (when full, i.e. behind): write each tenant's whole
        row groups only, which DuckDB appends far faster; the rest waits for the next flush."""
        held = self._store_held
        try:
            if aligned:
                done = held.written(await self.span_sink.flush_aligned())
            else:
                await self.span_sink.flush()
                done = held.written_all()
        except BaseException:
            held.forget()
            raise
        for event in done:
            event.ack()

    def held(self) -> dict[str, object]:
        """What this worker holds unacknowledged, per place (for the SIGUSR1 state dump)."""
        return {
            "live traces": self.assembler.live_traces,
            "assembly held messages": len(self._held),
            "assembly held per partition": dict(sorted(Counter(self._held_partition.values()).items())),
            "span sink rows": len(self.span_sink),
            "span sink held messages": len(self._store_held),
            "signal sink items": len(self.signal_sink),
            "integrity sink items": len(self.integrity),
            "owned store partitions": sorted(self.store.owned_partitions),
        }

    async def flush_spans_if_due(self) -> None:
        """Timer: a quiet tenant's spans are stored within ``store_flush_interval_s`` too."""
        if not self.span_sink.due(self.settings.store_flush_interval_s):
            return
        async with self._spans_lock:
            if not self.span_sink.due(self.settings.store_flush_interval_s):
                return
            try:
                await self._flush_spans(aligned=self.span_sink.full)
            except Exception:  # their offsets stay uncommitted: replayed after a restart
                logger.exception("store: flushing buffered spans failed")

    async def _on_assigned(self, sender: Any, *args: Any, signal: Any = None, **kwargs: Any) -> None:
        """Own the tenants of partitions assigned for *both* tenant-partitioned topics.

        faust's assignor co-partitions topics with the same partition count and
        the same subscribers (every downstream worker subscribes to both), so
        the two sets are equal; the intersection keeps one owner per tenant even
        when they are not (e.g. a rolling upgrade mixing subscriptions).
        """
        del sender, signal
        assigned = args[0] if args else kwargs.get("assigned", ())
        topics = self.settings.topics
        store = {tp.partition for tp in assigned if tp.topic == topics.store}
        pending = {tp.partition for tp in assigned if tp.topic == verdicts_topic(self.settings)}
        if store != pending:
            logger.warning(
                "store: %s partitions %s and %s partitions %s are not co-assigned; owning %s only",
                topics.store,
                sorted(store),
                verdicts_topic(self.settings),
                sorted(pending),
                sorted(store & pending),
            )
        self.store.assign(store & pending)

    async def _release_tenants(self, revoked: Any) -> None:
        """Before the new owners open them: finish the batch in flight, flush, close the files."""
        topics = self.settings.topics
        gone = {tp.partition for tp in revoked if tp.topic in (topics.store, verdicts_topic(self.settings))}
        if gone:
            await self.release_tenants(gone)

    async def release_tenants(self, partitions: set[int] | None = None) -> None:
        """Give up ``partitions`` (every one when ``None``, at shutdown) and close their files."""
        if not self.store.tracking:
            return
        locked = []
        deadline = time.monotonic() + 20.0
        for lock in (self._spans_lock, self._signals_lock):
            try:
                await asyncio.wait_for(lock.acquire(), timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                logger.warning("store: a sink batch is still writing after 20 s; releasing tenants anyway")
                break
            locked.append(lock)
        try:
            for sink in (self.span_sink, self.signal_sink, self.integrity):
                try:
                    if sink is self.span_sink:
                        await self._flush_spans()
                    else:
                        await sink.flush()
                except Exception:  # its messages are replayed from Kafka by the new owner
                    logger.warning("store: flushing %s at revocation failed", sink.step_id, exc_info=True)
            closed = await self.store.release(partitions)
            if self.ledger is not None:
                await self.ledger.release([t for t in self.ledger.open_tenants() if not self.store.owns(t)])
            if closed:
                logger.info("store: closed tenant files %s for their new owners", closed)
        finally:
            for lock in locked:
                lock.release()

    async def _on_traces(self, events: list[Any]) -> None:
        tables = [table for _, table in _tables(events, "evaluate")]
        if not tables:
            return
        closed = pa.concat_tables(tables)
        if self.settings.integrity.enabled_at_close:
            self.integrity.offer(closed)  # checked off the loop by a timer; never waits here
        for doc in await self._evaluate_guarded(closed):
            await self._send_verdict(doc)

    async def _send_verdict(self, doc: dict[str, Any]) -> Any:
        """Candidate signals go to their tenant's partition: the tenant's owner records them."""
        partition = tenant_partition(doc["tenant"], self.settings.topics.partitions)
        return await self.verdicts_topic.send(
            key=doc["signal_id"].encode(), value=dumps(doc), partition=partition
        )

    async def _evaluate_guarded(self, table: pa.Table) -> list[dict[str, Any]]:
        """Evaluate under the ``rules`` breaker, retrying the batch until it succeeds.

        A failing rule fails the batch until it is quarantined; the batch stays
        un-acknowledged meanwhile, so no verdict is lost to a transient error.
        """
        breaker = self.resilience.breakers.get(RULES)
        delay = 0.1
        while True:
            try:
                return breaker.call(self.evaluate.evaluate, table)
            except BetraceError as exc:
                if not exc.retriable:
                    raise
                logger.warning("evaluate: %s; retrying the batch", exc)
                await asyncio.sleep(max(delay, breaker.retry_after()))
                delay = min(delay * 2, 2.0)

    async def _on_verdicts(self, events: list[Any]) -> None:
        async with self._signals_lock:
            for event in self._owned_events(events):
                try:
                    self.signal_sink.add(loads(event.message.value))
                except DecodeError as exc:
                    logger.warning("signal sink: skipping a corrupt candidate signal: %s", exc)
            await self.signal_sink.flush()

    async def _published_already(self, suspects: dict[str, int]) -> set[str]:
        since_ms = min(suspects.values()) // 1_000_000
        keys = {signal_id.encode() for signal_id in suspects}
        found = await published_keys(self.settings.brokers, self.settings.topics.signals, keys, since_ms)
        return {key.decode() for key in found}

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


def close_tick_s(settings: Settings) -> float:
    """How often the assembler looks for due traces: a quarter of the shortest idle time."""
    delays = [settings.idle_timeout_s, settings.root_close_delay_s]
    for o in settings.assembly_tenants.values():
        delays += [o.idle_timeout_s or 0.0, o.root_close_delay_s or 0.0]
    shortest = min(d for d in delays if d > 0)
    return min(0.25, max(0.01, shortest / 4))


def build_pipeline(
    settings: Settings,
    rules: RuleSource,
    hooks: StageHooks | None = None,
    *,
    audit: AuditRecorder | None = None,
    breakers: BreakerRegistry | None = None,
) -> Pipeline:
    """Create the faust app for ``settings`` with every stage registered."""
    return Pipeline(settings, rules, hooks, audit=audit, breakers=breakers)
