"""``betrace import FILE``: OTLP/JSON requests from a file onto the input topic, as one run.

The file holds one ``ExportTraceServiceRequest`` per line (JSON lines, what
the Collector's file exporter writes), or a single request document. Each
request is validated with the worker's own OTLP/JSON decoder (so a line the
worker would reject is reported here, with its line number), converted to
protobuf when the input topic carries ``otlp_proto``, and produced like the
Collector's Kafka exporter would. From there it takes the same path as any
input: ingest, dedupe, the span store's upsert, rules.

Transient broker errors (unreachable, leader moving, timeouts) are retried
with exponential backoff and full jitter; the order of retried requests may
change, which the span store tolerates (versions are ordered by end time and
status, not by arrival). ``rate`` paces the sends in spans per second.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from betrace.audit import AuditRecorder
from betrace.config import Settings
from betrace.errors import BetraceError, BrokerError
from betrace.ingestion.audit import recorder_for
from betrace.ingestion.runs import IngestionRun, close_recorder
from betrace.streams.admin import MAX_MESSAGE_BYTES
from betrace.streams.otlp import OtlpDecoder, Record

logger = logging.getLogger(__name__)

#: A single-document file is parsed whole only up to this size; JSON lines have no limit.
MAX_DOCUMENT_BYTES = 512 * 1024 * 1024
_ID_FIELDS = ("traceId", "spanId", "parentSpanId")


class ImportLineError(BetraceError):
    """A line of the import file is not a usable OTLP/JSON request (with ``--strict``)."""


@dataclass(frozen=True, slots=True)
class ImportOptions:
    topic: str | None = None
    tenant: str | None = None
    rate: float = 0.0
    retries: int = 8
    strict: bool = False
    backoff_base_s: float = 0.2
    backoff_max_s: float = 10.0
    max_in_flight: int = 500


@dataclass(frozen=True, slots=True)
class Request:
    line: int
    value: bytes
    spans: int
    #: Why part of the request will be dead-lettered by the worker (invalid spans), if so.
    warning: str | None = None


@dataclass(frozen=True, slots=True)
class Malformed:
    line: int
    reason: str
    detail: str


def backoff_s(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    ceiling = min(cap, base * (2**attempt))
    return (rng or random).uniform(ceiling / 2, ceiling)  # half-jitter: never a zero wait


def _hex_ids_to_base64(doc: Any) -> None:
    """OTLP/JSON writes ids as hex; protobuf's JSON mapping wants base64 bytes."""
    for rs in doc.get("resourceSpans") or ():
        for ss in rs.get("scopeSpans") or ():
            for span in ss.get("spans") or ():
                for holder in (span, *(span.get("links") or ())):
                    for name in _ID_FIELDS:
                        value = holder.get(name)
                        if isinstance(value, str) and value:
                            holder[name] = base64.b64encode(bytes.fromhex(value)).decode()


def json_to_proto(raw: bytes) -> bytes:
    """One OTLP/JSON request as protobuf bytes (ValueError when it cannot be converted)."""
    doc = orjson.loads(raw)
    _hex_ids_to_base64(doc)
    try:
        message = json_format.ParseDict(doc, ExportTraceServiceRequest(), ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise ValueError(str(exc)) from None
    return bytes(message.SerializeToString())


class RequestReader:
    """Requests of a file, validated; malformed ones are reported with their line."""

    def __init__(self, path: Path, settings: Settings, tenant: str | None) -> None:
        self.path = path
        self.encoding = settings.topics.input_encoding
        self.decoder = OtlpDecoder(
            encoding="otlp_json", tenant_header=settings.tenant_header, default_tenant=settings.default_tenant
        )
        self.headers = [(settings.tenant_header, tenant.encode())] if tenant else []
        self.bytes_read = 0

    def _lines(self) -> Iterator[tuple[int, bytes]]:
        with self.path.open("rb") as fh:
            first = True
            for number, line in enumerate(fh, start=1):
                self.bytes_read += len(line)
                stripped = line.strip()
                if not stripped:
                    continue
                if first:
                    first = False
                    whole = self._whole_document(stripped)
                    if whole is not None:
                        self.bytes_read = self.path.stat().st_size
                        yield 1, whole
                        return
                yield number, stripped

    def _whole_document(self, first_line: bytes) -> bytes | None:
        """A pretty-printed single request: its first line alone is not JSON, the file is."""
        try:
            orjson.loads(first_line)
        except orjson.JSONDecodeError:
            size = self.path.stat().st_size
            if size <= MAX_DOCUMENT_BYTES:
                raw = self.path.read_bytes()
                try:
                    orjson.loads(raw)
                except orjson.JSONDecodeError:
                    return None
                return raw
        return None

    def __iter__(self) -> Iterator[Request | Malformed]:
        for number, raw in self._lines():
            yield self._check(number, raw)

    def _check(self, number: int, raw: bytes) -> Request | Malformed:
        decoded = self.decoder.decode([Record(value=raw, headers=self.headers)])
        spans = decoded.spans.num_rows
        warning = None
        for dead in decoded.dead_letters:
            if dead.reason != "invalid_span":
                return Malformed(number, dead.reason, dead.detail[:300])
            warning = dead.detail[:300]
        if spans == 0:
            return Malformed(number, "no_spans", warning or "the request holds no span")
        value = raw
        if self.encoding == "otlp_proto":
            try:
                value = json_to_proto(raw)
            except ValueError as exc:
                return Malformed(number, "not_convertible", str(exc)[:300])
        if len(value) > MAX_MESSAGE_BYTES:
            size = len(value)
            return Malformed(
                number, "too_large", f"{size:,} bytes; at most {MAX_MESSAGE_BYTES:,} per message"
            )
        return Request(number, value, spans, warning)


class Importer:
    """Produce the requests of one file with retries, a rate limit and progress callbacks."""

    def __init__(
        self,
        settings: Settings,
        run: IngestionRun,
        options: ImportOptions,
        *,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> None:
        self.settings = settings
        self.run = run
        self.options = options
        self.topic = options.topic or settings.topics.input
        self.on_progress = on_progress
        self.retries_used = 0
        self._rng = random.Random()  # noqa: S311 - jitter, not crypto

    async def _retrying(self, what: str, action: Callable[[], Any]) -> Any:
        attempt = 0
        while True:
            try:
                return await action()
            except (KafkaError, TimeoutError, OSError) as exc:
                transient = isinstance(exc, (KafkaConnectionError, TimeoutError, OSError)) or bool(
                    getattr(exc, "retriable", False)
                )
                if not transient or attempt >= self.options.retries:
                    tries = attempt + 1
                    msg = f"{what} failed after {tries} attempt(s) against {self.settings.brokers}: {exc!r}"
                    raise BrokerError(msg) from None
                delay = backoff_s(attempt, self.options.backoff_base_s, self.options.backoff_max_s, self._rng)
                logger.warning("%s: transient error %r; retry %d in %.2fs", what, exc, attempt + 1, delay)
                self.retries_used += 1
                attempt += 1
                await asyncio.sleep(delay)

    async def run_file(self, path: Path, tenant: str | None) -> None:
        reader = RequestReader(path, self.settings, tenant)

        async def start() -> AIOKafkaProducer:
            # A fresh client per attempt: a failed start leaves the old one unusable.
            candidate = AIOKafkaProducer(
                bootstrap_servers=self.settings.brokers,
                acks="all",
                linger_ms=5,
                max_request_size=MAX_MESSAGE_BYTES,
                request_timeout_ms=15_000,
            )
            try:
                await asyncio.wait_for(candidate.start(), 15)
            except BaseException:
                await candidate.stop()
                raise
            return candidate

        producer: AIOKafkaProducer = await self._retrying("connecting to Kafka", start)
        try:
            await self._produce_all(producer, reader)
        finally:
            await producer.stop()

    async def _produce_all(self, producer: AIOKafkaProducer, reader: RequestReader) -> None:
        counts = self.run.counts
        headers = reader.headers
        pending: list[tuple[asyncio.Future[Any], Request]] = []
        started = time.monotonic()
        last_checkpoint = started
        for item in reader:
            if isinstance(item, Malformed):
                counts.fail(item.reason, f"line {item.line}")
                logger.warning("line %d skipped: %s: %s", item.line, item.reason, item.detail)
                if self.options.strict:
                    msg = f"line {item.line}: {item.reason}: {item.detail}"
                    raise ImportLineError(msg)
                continue
            if item.warning:
                counts.fail("invalid_span", f"line {item.line}")
                logger.warning(
                    "line %d: some spans are invalid and will be dead-lettered: %s", item.line, item.warning
                )
            if self.options.rate > 0:
                # Pace by spans: the request may leave once the budget of the ones before it is spent.
                due = started + counts.spans / self.options.rate
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
            pending.append((await self._send(producer, item, headers), item))
            counts.messages += 1
            counts.spans += item.spans
            if len(pending) >= self.options.max_in_flight:
                await self._settle(producer, pending, headers)
            if self.on_progress is not None:
                self.on_progress(reader.bytes_read, counts.spans)
            if time.monotonic() - last_checkpoint >= self.run.checkpoint_s:
                last_checkpoint = time.monotonic()
                self.run.checkpoint()
        await self._settle(producer, pending, headers)
        if self.on_progress is not None:
            self.on_progress(reader.bytes_read, counts.spans)

    async def _send(
        self, producer: AIOKafkaProducer, item: Request, headers: list[tuple[str, bytes]]
    ) -> asyncio.Future[Any]:
        async def send() -> asyncio.Future[Any]:
            fut: asyncio.Future[Any] = await producer.send(self.topic, value=item.value, headers=headers)
            return fut

        result: asyncio.Future[Any] = await self._retrying(f"line {item.line}: producing", send)
        return result

    async def _settle(
        self,
        producer: AIOKafkaProducer,
        pending: list[tuple[asyncio.Future[Any], Request]],
        headers: list[tuple[str, bytes]],
    ) -> None:
        """Wait for the in-flight sends; resend the ones a transient error failed."""
        while pending:
            results = await asyncio.gather(*(fut for fut, _ in pending), return_exceptions=True)
            failed = [
                item for (_, item), res in zip(pending, results, strict=True) if isinstance(res, Exception)
            ]
            pending.clear()
            for item in failed:

                async def once(item: Request = item) -> Any:
                    fut = await producer.send(self.topic, value=item.value, headers=headers)
                    return await fut

                await self._retrying(f"line {item.line}: producing", once)


def import_file(
    settings: Settings,
    path: Path,
    options: ImportOptions,
    *,
    audit: AuditRecorder | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[IngestionRun, Importer]:
    """Import ``path`` as one ingestion run; the run is finished (or failed) whatever happens."""
    if not path.is_file():
        msg = f"{path}: no such file"
        raise ImportLineError(msg)
    owned = audit is None
    recorder = audit if audit is not None else recorder_for(settings)
    run = IngestionRun(
        settings.data_dir,
        "import",
        str(path.resolve()),
        checkpoint_s=settings.integrity.run_checkpoint_s,
        audit=recorder,
        actor="cli:import",
        note=f"topic={options.topic or settings.topics.input} rate={options.rate or 'unlimited'}",
    )
    run.start()
    importer = Importer(settings, run, options, on_progress=on_progress)
    try:
        asyncio.run(importer.run_file(path, options.tenant))
    except KeyboardInterrupt:
        run.finish("interrupted")
        raise
    except BetraceError as exc:
        run.finish("failed", error=str(exc))
        raise
    except OSError as exc:
        run.finish("failed", error=str(exc))
        msg = f"{path}: {exc.strerror or exc}"
        raise ImportLineError(msg) from None
    else:
        run.finish("finished")
    finally:
        if owned:
            close_recorder(recorder)
    return run, importer
