"""POST /v1/traces on the real broker: bodies flow to signals; bad ones and overload are refused."""

from __future__ import annotations

import asyncio
import base64
import gzip
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import OffsetAndMetadata
from google.protobuf.json_format import MessageToDict
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from typer.testing import CliRunner

from betrace.cli.main import app as cli
from betrace.config import Settings, settings_env
from betrace.config.sections import ReceiverSettings
from betrace.dev.worker import WorkerProcess
from betrace.receiver import Receiver, build_app, ingest_group
from betrace.workload.generator import TraceGenerator
from betrace.workload.otlp import batch_messages
from tests.integration.helpers import read_topic, signal_keys, stored, wait_until_drained

pytestmark = pytest.mark.integration

PROTO = {"Content-Type": "application/x-protobuf"}
JSON = {"Content-Type": "application/json"}


def otlp_json(value: bytes) -> bytes:
    """The OTLP/JSON form SDKs send: camelCase fields, hex ids."""
    request = ExportTraceServiceRequest()
    request.ParseFromString(value)
    doc = MessageToDict(request)
    for rs in doc["resourceSpans"]:
        for ss in rs["scopeSpans"]:
            for span in ss["spans"]:
                for name in ("traceId", "spanId", "parentSpanId"):
                    if name in span:
                        span[name] = base64.b64decode(span[name]).hex()
    return orjson.dumps(doc)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _with_receiver(cfg: Settings, body: Callable[[aiohttp.ClientSession, str], Awaitable[Any]]) -> Any:
    """Run ``body`` against a standalone receiver app on a real port."""

    async def run() -> Any:
        server = TestServer(build_app(Receiver(cfg)), host="127.0.0.1")
        await server.start_server()
        try:
            async with aiohttp.ClientSession() as session:
                return await body(session, str(server.make_url("/v1/traces")))
        finally:
            await server.close()

    return asyncio.run(run())


def _receiver_cfg(cfg: Settings, **receiver: Any) -> Settings:
    return cfg.model_copy(update={"receiver": ReceiverSettings(**receiver)})


def test_worker_accepts_protobuf_gzip_and_json_and_signals_match_ground_truth(
    pipeline_settings: Settings, tmp_path: Path
) -> None:
    port = _free_port()
    cfg = pipeline_settings.model_copy(update={"web_port": port})
    gen = TraceGenerator(tenants=("default", "acme"), violation_rate=0.3, seed=21)
    messages = list(batch_messages(gen.traces(3_000), spans_per_message=150))
    worker = WorkerProcess(cfg, tmp_path / "worker.log")
    worker.start()
    url = f"http://127.0.0.1:{port}/v1/traces"

    async def post_all() -> list[int]:
        statuses = []
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 60
            while True:  # until the worker's web server is up
                try:
                    async with session.get(f"http://127.0.0.1:{port}/health/live") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                assert worker.alive and time.monotonic() < deadline, worker.log_tail()
                await asyncio.sleep(0.3)
            for i, m in enumerate(messages):
                tenant = {"X-Scope-OrgID": m.tenant}
                if i % 3 == 0:
                    headers, data = {**PROTO, **tenant}, m.value
                elif i % 3 == 1:
                    headers, data = {**PROTO, **tenant, "Content-Encoding": "gzip"}, gzip.compress(m.value)
                else:
                    headers, data = {**JSON, **tenant}, otlp_json(m.value)
                async with session.post(url, data=data, headers=headers) as r:
                    body = await r.read()
                    assert r.status == 200, body
                    statuses.append(r.status)
                    if headers["Content-Type"] == PROTO["Content-Type"]:
                        reply = ExportTraceServiceResponse()
                        reply.ParseFromString(body)
                        assert not reply.HasField("partial_success")
                    else:
                        assert orjson.loads(body) == {}
        return statuses

    try:
        assert len(asyncio.run(post_all())) == len(messages)
        wait_until_drained(cfg, worker, timeout_s=120)
        time.sleep(cfg.idle_timeout_s + 2)  # the last traces close on the idle timer
        wait_until_drained(cfg, worker, timeout_s=60)
        signals = signal_keys(cfg)
    finally:
        assert worker.stop() == 0, worker.log_tail()

    # One record per trace, keyed by its trace id, tenant in the header.
    records = read_topic(cfg, cfg.topics.input)
    assert len(records) == gen.truth.traces
    assert all(len(r.key) == 32 for r in records)
    assert len(signals) == len(set(signals))
    assert sorted(signals) == sorted(gen.truth.expected)
    counts = stored(cfg)
    assert sum(c[0] for c in counts.values()) == gen.truth.spans
    assert set(counts) == {"default", "acme"}


def test_bad_requests_get_400_413_415_with_reasons(pipeline_settings: Settings) -> None:
    cfg = _receiver_cfg(pipeline_settings, max_body_bytes=4096, lag_interval_s=0)
    gen = TraceGenerator(tenants=("acme",), violation_rate=0.0, seed=3)
    good = next(iter(batch_messages(gen.traces(20), spans_per_message=10))).value
    assert len(good) < 4096

    async def body(session: aiohttp.ClientSession, url: str) -> None:
        async def post(data: Any, headers: dict[str, str]) -> tuple[int, bytes, Any]:
            async with session.post(url, data=data, headers=headers) as r:
                return r.status, await r.read(), r.headers

        status, raw, _ = await post(b"hello", {"Content-Type": "text/plain"})
        assert status == 415 and b"Content-Type" in raw
        status, raw, _ = await post(good, {**PROTO, "Content-Encoding": "snappy"})
        assert status == 415 and b"Content-Encoding" in raw
        status, raw, headers = await post(b"\xff\xff\xff\xff", PROTO)
        assert status == 400 and headers["Content-Type"] == "application/x-protobuf"
        assert b"not a protobuf ExportTraceServiceRequest" in raw  # google.rpc.Status, message field
        status, raw, _ = await post(b'{"resourceSpans": [', JSON)
        assert status == 400 and orjson.loads(raw)["message"].startswith("the body is not valid JSON")
        status, raw, _ = await post(good, {**PROTO, "X-Scope-OrgID": "no spaces allowed"})
        assert status == 400 and b"X-Scope-OrgID" in raw
        status, raw, _ = await post(b"x" * 5000, PROTO)  # Content-Length over the limit
        assert status == 413 and b"Content-Length 5000" in raw

        async def chunked() -> Any:  # no Content-Length: the limit holds while reading
            for _ in range(10):
                yield b"y" * 1000

        status, raw, _ = await post(chunked(), PROTO)
        assert status == 413 and b"exceeds the limit" in raw
        bomb = gzip.compress(b"\0" * 100_000)
        assert len(bomb) < 4096
        status, raw, _ = await post(bomb, {**PROTO, "Content-Encoding": "gzip"})
        assert status == 413 and b"(decompressed) exceeds" in raw

        # Some spans invalid: 200 with partial_success, the rest produced.
        request = ExportTraceServiceRequest()
        request.ParseFromString(good)
        request.resource_spans[0].scope_spans[0].spans[0].trace_id = bytes(16)
        status, raw, _ = await post(request.SerializeToString(), {**PROTO, "X-Scope-OrgID": "acme"})
        assert status == 200
        reply = ExportTraceServiceResponse()
        reply.ParseFromString(raw)
        assert reply.partial_success.rejected_spans == 1
        assert "trace_id" in reply.partial_success.error_message

    _with_receiver(cfg, body)
    records = read_topic(cfg, cfg.topics.input)
    assert records, "the valid spans of the partial request were not produced"
    assert {h for r in records for h in r.headers} == {("X-Scope-OrgID", b"acme")}


def test_503_with_retry_after_when_the_queue_is_saturated(pipeline_settings: Settings) -> None:
    cfg = _receiver_cfg(pipeline_settings, queue_size=2, lag_interval_s=0, retry_after_s=7)
    gen = TraceGenerator(tenants=("acme",), violation_rate=0.0, seed=4)
    bodies = [m.value for m in batch_messages(gen.traces(4_000), spans_per_message=100)]

    async def body(session: aiohttp.ClientSession, url: str) -> list[tuple[int, str | None, bytes]]:
        async def post(data: bytes) -> tuple[int, str | None, bytes]:
            async with session.post(url, data=data, headers=PROTO) as r:
                return r.status, r.headers.get("Retry-After"), await r.read()

        return list(await asyncio.gather(*(post(b) for b in bodies)))

    results = _with_receiver(cfg, body)
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 503]
    assert ok and refused and len(ok) + len(refused) == len(results)
    assert all(r[1] == "7" for r in refused)
    assert all(b"above 90% full" in r[2] for r in refused)
    # Exactly the accepted requests reached the topic: one record per trace.
    traces_ok = sum(
        len({s.trace_id for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans})
        for req in (
            ExportTraceServiceRequest.FromString(bodies[i]) for i, r in enumerate(results) if r[0] == 200
        )
    )
    assert len(read_topic(cfg, cfg.topics.input)) == traces_ok


def test_503_while_the_input_lag_is_over_the_limit_then_200_once_consumed(
    pipeline_settings: Settings,
) -> None:
    cfg = _receiver_cfg(pipeline_settings, max_input_lag=0, lag_interval_s=0.5)
    group = ingest_group(cfg)
    assert group == cfg.app_id
    gen = TraceGenerator(tenants=("acme",), violation_rate=0.0, seed=5)
    one = next(iter(batch_messages(gen.traces(50), spans_per_message=50))).value

    async def commit_everything() -> None:
        consumer = AIOKafkaConsumer(bootstrap_servers=cfg.brokers, group_id=group, enable_auto_commit=False)
        await consumer.start()
        try:
            parts = [TopicPartition(cfg.topics.input, p) for p in range(cfg.topics.partitions)]
            ends = await consumer.end_offsets(parts)
            consumer.assign(parts)
            await consumer.commit({tp: OffsetAndMetadata(end, "") for tp, end in ends.items()})
        finally:
            await consumer.stop()

    async def body(session: aiohttp.ClientSession, url: str) -> None:
        async def post() -> tuple[int, str | None, bytes]:
            async with session.post(url, data=one, headers=PROTO) as r:
                return r.status, r.headers.get("Retry-After"), await r.read()

        assert (await post())[0] == 200  # empty topic: no lag yet
        await asyncio.sleep(0.7)  # the cached reading expires; nobody consumes
        await post()  # triggers the background refresh
        await asyncio.sleep(0.5)
        status, retry_after, raw = await post()
        assert status == 503 and retry_after == "5"
        assert b"consumer lag" in raw and b"over the limit of 0" in raw
        await commit_everything()  # the consumer catches up
        await asyncio.sleep(0.7)
        await post()
        await asyncio.sleep(0.5)
        assert (await post())[0] == 200

    _with_receiver(cfg, body)


def test_betrace_receive_runs_standalone_and_stops_on_sigterm(
    pipeline_settings: Settings, tmp_path: Path
) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BETRACE_")}
    env.update(settings_env(pipeline_settings))
    log = (tmp_path / "receive.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "betrace", "receive", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    gen = TraceGenerator(tenants=("acme",), violation_rate=0.0, seed=6)
    message = next(iter(batch_messages(gen.traces(60), spans_per_message=60)))

    async def post() -> int:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 30
            while True:
                try:
                    async with session.post(
                        f"http://127.0.0.1:{port}/v1/traces",
                        data=otlp_json(message.value),
                        headers={**JSON, "X-Scope-OrgID": "acme"},
                    ) as r:
                        return r.status
                except aiohttp.ClientConnectionError:
                    assert proc.poll() is None and time.monotonic() < deadline, (
                        tmp_path / "receive.log"
                    ).read_text()
                    await asyncio.sleep(0.3)

    try:
        assert asyncio.run(post()) == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        log.close()
    assert code == 0, (tmp_path / "receive.log").read_text()
    records = read_topic(pipeline_settings, pipeline_settings.topics.input)
    assert len(records) == gen.truth.traces
    assert {dict(r.headers)["X-Scope-OrgID"] for r in records} == {b"acme"}


def test_betrace_receive_rejects_a_bad_port_clearly() -> None:
    result = CliRunner().invoke(cli, ["receive", "--port", "70000"])
    assert result.exit_code == 1
    assert "error:" in result.output and "70000" in result.output


def test_503_with_retry_after_when_kafka_does_not_answer(pipeline_settings: Settings) -> None:
    port = _free_port()  # nothing listens there: every connection is refused
    cfg = _receiver_cfg(pipeline_settings, lag_interval_s=0).model_copy(
        update={"brokers": f"127.0.0.1:{port}"}
    )
    gen = TraceGenerator(tenants=("acme",), violation_rate=0.0, seed=7)
    one = next(iter(batch_messages(gen.traces(20), spans_per_message=20))).value

    async def body(session: aiohttp.ClientSession, url: str) -> tuple[int, str | None, bytes]:
        async with session.post(url, data=one, headers=PROTO) as r:
            return r.status, r.headers.get("Retry-After"), await r.read()

    status, retry_after, raw = _with_receiver(cfg, body)
    assert status == 503 and retry_after == "5"
    assert b"cannot reach Kafka" in raw
