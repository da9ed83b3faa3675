"""Put breakers, spools, backpressure and quarantine around a worker's sinks and stages."""

from __future__ import annotations

import fcntl
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import pyarrow as pa

from betrace.audit.events import AuditRecorder
from betrace.errors import ConfigError
from betrace.resilience.backpressure import Backpressure
from betrace.resilience.breakers import DUCKDB, LEDGER, RULES, BreakerRegistry
from betrace.resilience.guard import SpooledWriter
from betrace.resilience.quarantine import RuleQuarantine, key_of
from betrace.resilience.spool import Spool
from betrace.streams.codecs import dumps, ipc_to_table, loads, table_to_ipc

if TYPE_CHECKING:
    from betrace.config import Settings
    from betrace.metrics import StageHooks
    from betrace.rules.loader import RuleSource
    from betrace.sinks.duckdb_store import SpanStoreSink
    from betrace.sinks.signals import SignalSink

logger = logging.getLogger(__name__)


#: Spool slots this process holds: base directory -> (slot directory, open lock file).
_SLOTS: dict[Path, tuple[Path, IO[bytes]]] = {}
_SLOTS_LOCK = threading.Lock()
MAX_SLOTS = 256


def spool_root(settings: Settings) -> Path:
    """This process's spool directory under ``BETRACE_RESILIENCE__SPOOL_DIR`` (else ``<data_dir>/spool``).

    Workers sharing a data directory must not share a spool, and a restarted
    worker must find what its predecessor left. So each process claims the first
    free ``slot-<n>`` under the base with an exclusive ``flock`` that it holds
    until it exits (the kernel drops it even on ``kill -9``): a restart takes a
    free slot again and replays whatever a dead worker left in it.
    """
    configured = settings.resilience.spool_dir
    base = (Path(configured) if configured else settings.data_dir / "spool").resolve()
    with _SLOTS_LOCK:
        held = _SLOTS.get(base)
        if held is not None:
            return held[0]
        base.mkdir(parents=True, exist_ok=True)
        for n in range(MAX_SLOTS):
            slot = base / f"slot-{n}"
            slot.mkdir(exist_ok=True)
            lock = (slot / ".lock").open("ab")
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                continue
            _SLOTS[base] = (slot, lock)
            logger.info("spool: this process uses %s", slot)
            return slot
    msg = f"all {MAX_SLOTS} spool slots under {base} are held by running processes"
    raise ConfigError(msg)


def encode_spans(batch: list[pa.Table]) -> tuple[bytes, int]:
    table = pa.concat_tables(batch) if len(batch) > 1 else batch[0]
    return table_to_ipc(table), table.num_rows


def decode_spans(payload: bytes) -> list[pa.Table]:
    return [ipc_to_table(payload)]


def encode_signals(batch: list[dict[str, Any]]) -> tuple[bytes, int]:
    return dumps(batch), len(batch)


def decode_signals(payload: bytes) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = loads(payload)
    return docs


@dataclass
class Resilience:
    """Everything issue 7 adds to a worker; the pipeline holds one."""

    settings: Settings
    breakers: BreakerRegistry
    backpressure: Backpressure
    quarantine: RuleQuarantine
    hooks: StageHooks | None = None
    writers: list[SpooledWriter[Any]] = field(default_factory=list)

    @staticmethod
    def build(
        settings: Settings,
        *,
        hooks: StageHooks | None = None,
        audit: AuditRecorder | None = None,
        breakers: BreakerRegistry | None = None,
    ) -> Resilience:
        """``breakers``: share the worker's registry (the cache tier's "redis" breaker lives there)."""
        if breakers is not None and audit is not None:
            breakers.set_audit(audit)
        return Resilience(
            settings=settings,
            breakers=breakers or BreakerRegistry.from_settings(settings, audit=audit, hooks=hooks),
            backpressure=Backpressure.from_settings(settings, hooks),
            quarantine=RuleQuarantine.from_settings(settings, audit=audit, hooks=hooks),
            hooks=hooks,
        )

    def _spool(self, name: str) -> Spool:
        r = self.settings.resilience

        def corrupt(spool: str, n: int) -> None:
            if self.hooks is not None:
                self.hooks.count("betrace_spool_corrupt_total", n, spool=spool)

        return Spool(
            spool_root(self.settings) / name,
            name=name,
            max_bytes=r.spool_max_bytes,
            segment_bytes=r.spool_segment_bytes,
            on_corrupt=corrupt,
        )

    def guard_span_sink(self, sink: SpanStoreSink, topics: list[str]) -> None:
        """``duckdb`` breaker + ``spans`` spool around the span store; pause ``topics`` when full."""
        sink.breaker = self.breakers.get(DUCKDB)
        writer: SpooledWriter[pa.Table] = SpooledWriter(
            name="spans",
            spool=self._spool("spans"),
            write=sink.write_now,
            encode=encode_spans,
            decode=decode_spans,
            gates=[sink.breaker],
            hooks=self.hooks,
        )
        sink.writer = writer
        self.writers.append(writer)
        self.backpressure.register("spool.spans", writer.level, topics)
        self.backpressure.register("sink.duckdb", lambda: len(sink) / sink.max_items, topics)

    def guard_signal_sink(self, sink: SignalSink, topics: list[str]) -> None:
        """``duckdb`` and ``ledger`` breakers + ``signals`` spool around the signal sink."""
        sink.breaker = self.breakers.get(DUCKDB)
        gates = [sink.breaker]
        if sink.ledger is not None:
            sink.ledger_breaker = self.breakers.get(LEDGER)
            gates.append(sink.ledger_breaker)
        writer: SpooledWriter[dict[str, Any]] = SpooledWriter(
            name="signals",
            spool=self._spool("signals"),
            write=sink.write_now,
            encode=encode_signals,
            decode=decode_signals,
            gates=gates,
            hooks=self.hooks,
        )
        sink.writer = writer
        self.writers.append(writer)
        self.backpressure.register("spool.signals", writer.level, topics)

    def rules_breaker_level(self) -> float:
        """1.0 while the ``rules`` breaker is open: the evaluate stage cannot make progress."""
        return 1.0 if self.breakers.get(RULES).state == "open" else 0.0

    async def tick(self, consumer: Any, rules: RuleSource | None = None) -> None:
        """Worker timer: replay spools whose breakers allow it, apply backpressure, lift stale quarantines."""
        self.backpressure.apply(consumer)
        for writer in self.writers:
            await writer.drain()
        self.backpressure.apply(consumer)
        if rules is not None and self.quarantine.quarantined():
            live = {key_of(c.rule) for cs in rules.current().tenants.values() for c in cs}
            self.quarantine.forget_superseded(live)

    def pending_items(self) -> dict[str, int]:
        return {w.name: w.spool.items for w in self.writers}

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
