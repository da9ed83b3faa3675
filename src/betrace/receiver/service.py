"""The OTLP/HTTP receiver: ``POST /v1/traces`` onto the input topic, with backpressure.

A request is answered 200 only after Kafka acknowledged (``acks=all``) every
record it produced, so a 200 means the spans are durable. Admission control
comes before the body is read:

* the receiver's own queue (records sent but not yet acknowledged) above 90%
  of ``queue_size`` → 503;
* the consumer lag of the ingest group on the input topic above
  ``max_input_lag`` → 503. The lag is read at most once per ``lag_interval_s``
  in the background; requests use the cached figure;
* an extra pressure signal (for example open breakers downstream) → 503.

Every 503 carries ``Retry-After``. A retried request may duplicate records the
first attempt already delivered (a timeout after the send); the ingest dedupe
and the idempotent sinks absorb that.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from betrace.config import Settings
from betrace.errors import BrokerError
from betrace.metrics import StageHooks
from betrace.receiver import codec
from betrace.streams.lag import LagReader
from betrace.streams.otlp import _TENANT_RE

logger = logging.getLogger(__name__)

STEP_ID = "receiver"
PATH = "/v1/traces"
#: Share of the queue above which new requests are refused.
HIGH_WATER = 0.9
_CHUNK = 64 * 1024
_SEND_TIMEOUT_S = 10.0  # OTLP exporters give up after 10 s by default


def ingest_group(settings: Settings) -> str:
    """The consumer group that reads the input topic (the lag that counts)."""
    if settings.receiver.lag_group:
        return settings.receiver.lag_group
    return settings.app_id if settings.stages == "all" else f"{settings.app_id}.ingest"


class PressureSource(Protocol):
    """What the receiver needs of :class:`betrace.resilience.backpressure.Backpressure`."""

    def is_saturated(self) -> bool: ...

    def reasons(self) -> list[str]: ...


def pressure_from(source: PressureSource) -> Callable[[], str | None]:
    """A refusal reason while the worker's own buffers are saturated (its stages are paused)."""

    def reason() -> str | None:
        if not source.is_saturated():
            return None
        return "pipeline backpressure: " + ("; ".join(source.reasons()) or "saturated")

    return reason


class _NoHooks:
    def count(self, name: str, value: float = 1, **labels: str) -> None:
        return None

    def gauge(self, name: str, value: float, **labels: str) -> None:
        return None

    def observe(self, name: str, value: float, **labels: str) -> None:
        return None


class LagGate:
    """The input topic's consumer lag, refreshed in the background at most every ``interval_s``."""

    def __init__(self, brokers: str, group: str, topic: str, *, interval_s: float) -> None:
        self.group = group
        self.topic = topic
        self.interval_s = interval_s
        self.value: int | None = None
        self.error: str | None = None
        self.taken_at = 0.0
        self._reader = LagReader(brokers, timeout_s=5.0)
        self._started = False
        self._refresh: asyncio.Task[None] | None = None

    async def current(self) -> int | None:
        """The cached lag; the first call waits for a reading (bounded), later ones never do."""
        if self.interval_s <= 0:
            return None
        stale = time.monotonic() - self.taken_at >= self.interval_s
        if stale and (self._refresh is None or self._refresh.done()):
            self._refresh = asyncio.create_task(self._read(), name="betrace.receiver.lag")
        if self.value is None and self.error is None and self._refresh is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._refresh), timeout=5.0)
            except TimeoutError:
                logger.warning("receiver: first lag reading of %s is slow; admitting meanwhile", self.group)
        return self.value

    async def _read(self) -> None:
        try:
            if not self._started:
                await self._reader.start()
                self._started = True
            lags = await self._reader.lag(self.group, [self.topic])
        except BrokerError as exc:
            # No reading means no lag verdict: the produce path reports a dead broker itself.
            self.error = str(exc)
            self.value = None
            logger.warning("receiver: cannot read the lag of %s: %s", self.group, exc)
        else:
            self.error = None
            self.value = sum(p.lag for p in lags)
        self.taken_at = time.monotonic()

    async def stop(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            await asyncio.gather(self._refresh, return_exceptions=True)
        if self._started:
            await self._reader.stop()
            self._started = False


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    reason: str


class Receiver:
    """Accepts OTLP/HTTP trace exports and produces them to the input topic."""

    step_id = STEP_ID

    def __init__(
        self,
        settings: Settings,
        hooks: StageHooks | None = None,
        *,
        pressure: Callable[[], str | None] | None = None,
    ) -> None:
        self.settings = settings
        self.cfg = settings.receiver
        self.hooks: StageHooks = hooks or _NoHooks()
        self.pressure = pressure
        self.in_flight = 0
        self.lag = LagGate(
            settings.brokers,
            ingest_group(settings),
            settings.topics.input,
            interval_s=self.cfg.lag_interval_s,
        )
        self._producer: AIOKafkaProducer | None = None
        self._starting = asyncio.Lock()

    # ------------------------------------------------------------------ lifecycle

    async def _ensure_producer(self) -> AIOKafkaProducer:
        # Started on first use: a worker that never receives a request opens no extra connection.
        async with self._starting:
            if self._producer is None:
                producer = AIOKafkaProducer(
                    bootstrap_servers=self.settings.brokers,
                    acks="all",
                    enable_idempotence=True,
                    linger_ms=2,
                    max_request_size=16 * 1024 * 1024,
                    request_timeout_ms=int(_SEND_TIMEOUT_S * 1000),
                )
                try:
                    await asyncio.wait_for(producer.start(), _SEND_TIMEOUT_S)
                except (KafkaError, TimeoutError, OSError) as exc:
                    await producer.stop()
                    msg = f"cannot reach Kafka at {self.settings.brokers}: {exc}"
                    raise BrokerError(msg) from None
                self._producer = producer
            return self._producer

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()
        await self.lag.stop()

    # ------------------------------------------------------------------ admission

    @property
    def fill(self) -> float:
        return self.in_flight / self.cfg.queue_size

    async def refusal(self) -> Refusal | None:
        """Why a request would be refused with 503 now, or None."""
        if self.fill >= HIGH_WATER:
            return Refusal(
                503, f"receiver queue {self.in_flight}/{self.cfg.queue_size} records, above 90% full"
            )
        if self.pressure is not None:
            reason = self.pressure()
            if reason:
                return Refusal(503, reason)
        lag = await self.lag.current()
        if lag is not None and lag > self.cfg.max_input_lag:
            return Refusal(
                503,
                f"consumer lag of {self.lag.group} on {self.lag.topic} is {lag}, "
                f"over the limit of {self.cfg.max_input_lag}",
            )
        return None

    # ------------------------------------------------------------------ the handler

    def _reply(self, status: int, body: bytes, content_type: str, *, retry: bool = False) -> web.Response:
        headers = {"Retry-After": str(self.cfg.retry_after_s)} if retry else None
        self.hooks.count("betrace_receiver_requests_total", code=str(status))
        return web.Response(status=status, body=body, content_type=content_type, headers=headers)

    def _error(self, status: int, reason: str, content_type: str) -> web.Response:
        code = {
            400: codec.CODE_INVALID_ARGUMENT,
            413: codec.CODE_INVALID_ARGUMENT,
            415: codec.CODE_UNIMPLEMENTED,
            503: codec.CODE_UNAVAILABLE,
        }.get(status, codec.CODE_UNAVAILABLE)
        ctype = content_type if content_type in codec.CONTENT_TYPES else codec.JSON
        if status >= 500:
            logger.warning("receiver: %d %s", status, reason)
        else:
            logger.info("receiver: %d %s", status, reason)
        return self._reply(status, codec.status_body(code, reason, ctype), ctype, retry=status == 503)

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.cfg.max_body_bytes
        declared = request.content_length
        if declared is not None and declared > limit:
            msg = f"Content-Length {declared} exceeds the limit of {limit} bytes"
            raise codec.BodyError(413, msg)
        # Enforced while reading too: chunked bodies declare no length.
        parts: list[bytes] = []
        size = 0
        # aiohttp inflates gzip bodies as they stream in, so this bounds the inflated size.
        inflated = " (decompressed)" if request.headers.get("Content-Encoding", "").lower() == "gzip" else ""
        try:
            async for chunk in request.content.iter_chunked(_CHUNK):
                size += len(chunk)
                if size > limit:
                    msg = f"the body{inflated} exceeds the limit of {limit} bytes"
                    raise codec.BodyError(413, msg)
                parts.append(chunk)
        except web.RequestPayloadError as exc:
            msg = f"the body cannot be read: {exc}".replace("\n", " ")
            raise codec.BodyError(400, msg) from None
        return b"".join(parts)

    def _tenant(self, request: web.Request) -> str | None:
        tenant = request.headers.get(self.settings.tenant_header, "").strip()
        if not tenant:
            return None  # ingest falls back to the tenant.id resource attribute, then the default
        if not _TENANT_RE.fullmatch(tenant):
            msg = f"header {self.settings.tenant_header} {tenant[:80]!r} must match {_TENANT_RE.pattern}"
            raise codec.BodyError(400, msg)
        return tenant

    async def handle(self, request: web.Request) -> web.Response:
        """``POST /v1/traces``."""
        ctype = codec.media_type(request.headers.get("Content-Type"))
        reply_type = ctype if ctype in codec.CONTENT_TYPES else codec.JSON
        try:
            split, tenant = await self._accept(request, ctype)
            if split.records:
                # Checked again: other requests may have filled the queue while this body was read.
                await self._admit()
                # Reserved before the first await, so concurrent requests see each other.
                self.in_flight += len(split.records)
                self.hooks.gauge("betrace_receiver_queue_fill", self.fill)
                try:
                    await self._produce(split.records, tenant)
                except BrokerError as exc:
                    raise codec.BodyError(503, str(exc)) from None
                finally:
                    self.in_flight -= len(split.records)
                    self.hooks.gauge("betrace_receiver_queue_fill", self.fill)
        except codec.BodyError as exc:
            return self._error(exc.status, exc.reason, reply_type)
        if split.rejected:
            self.hooks.count("betrace_receiver_spans_total", split.rejected, outcome="rejected")
        if split.accepted:
            self.hooks.count("betrace_receiver_spans_total", split.accepted, outcome="accepted")
        return self._reply(200, codec.success_body(split, ctype), ctype)

    async def _admit(self) -> None:
        refused = await self.refusal()
        if refused is not None:
            raise codec.BodyError(refused.status, refused.reason)

    async def _accept(self, request: web.Request, ctype: str) -> tuple[codec.SplitRequest, str | None]:
        """Headers, admission, then the body: cheap refusals come before reading it."""
        if ctype not in codec.CONTENT_TYPES:
            wanted = " or ".join(codec.CONTENT_TYPES)
            msg = f"Content-Type {ctype or '(none)'!r} is not supported; use {wanted}"
            raise codec.BodyError(415, msg)
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity", "gzip"):
            msg = f"Content-Encoding {encoding!r} is not supported; use gzip or none"
            raise codec.BodyError(415, msg)
        await self._admit()
        tenant = self._tenant(request)
        body = await self._read_body(request)
        if encoding == "gzip" and body[:2] == codec.GZIP_MAGIC:
            # Only a server that does not inflate on its own leaves the gzip stream here;
            # an inflated OTLP body never starts with these bytes.
            body = codec.gunzip(body, self.cfg.max_body_bytes)
        parsed = codec.parse_request(body, ctype)
        return codec.split_by_trace(parsed, self.settings.topics.input_encoding), tenant

    async def _produce(self, records: list[codec.TraceRecord], tenant: str | None) -> None:
        producer = await self._ensure_producer()
        headers = [(self.settings.tenant_header, tenant.encode())] if tenant else []
        try:
            futures = [
                await producer.send(self.settings.topics.input, value=r.value, key=r.key, headers=headers)
                for r in records
            ]
            await asyncio.wait_for(asyncio.gather(*futures), _SEND_TIMEOUT_S)
        except (KafkaError, TimeoutError) as exc:
            msg = f"producing to {self.settings.topics.input} failed: {type(exc).__name__}: {exc}"
            raise BrokerError(msg) from None


def build_app(receiver: Receiver) -> web.Application:
    """A standalone aiohttp app serving only ``POST /v1/traces``."""
    app = web.Application()
    app.router.add_post(PATH, receiver.handle)

    async def _close(_: web.Application) -> None:
        await receiver.stop()

    app.on_cleanup.append(_close)
    return app
