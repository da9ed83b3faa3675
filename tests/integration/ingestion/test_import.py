"""``betrace import`` against the real broker and a real worker.

Counts, idempotence, failures with line numbers, the rate limit and retries.
"""

from __future__ import annotations

import base64
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from google.protobuf import json_format
from typer.testing import CliRunner

from betrace.cli.main import app
from betrace.config import Settings, settings_env
from betrace.errors import BrokerError
from betrace.ingestion.importer import ImportOptions, import_file
from betrace.ingestion.runs import RunStore
from betrace.workload.generator import TraceGenerator
from betrace.workload.otlp import encode_request
from tests.integration.helpers import read_topic, run_worker_over, stored


def otlp_json_lines(seed: int, spans: int, per_request: int = 3) -> tuple[list[bytes], int]:
    """OTLP/JSON requests (hex ids, as the Collector writes them) and how many spans they hold."""
    gen = TraceGenerator(tenants=("acme",), violation_rate=0.2, seed=seed)
    traces = list(gen.traces(spans))
    lines = []
    for i in range(0, len(traces), per_request):
        doc = json_format.MessageToDict(encode_request(traces[i : i + per_request]))
        for rs in doc["resourceSpans"]:
            for ss in rs["scopeSpans"]:
                for span in ss["spans"]:
                    for name in ("traceId", "spanId", "parentSpanId"):
                        if name in span:
                            span[name] = base64.b64decode(span[name]).hex()
        lines.append(orjson.dumps(doc))
    return lines, gen.truth.spans


def invoke(cfg: Settings, *args: str) -> Any:
    return CliRunner().invoke(app, list(args), env=settings_env(cfg), catch_exceptions=False)


def test_import_jsonl_twice_stores_each_span_once(pipeline_settings: Settings, tmp_path: Path) -> None:
    cfg = pipeline_settings
    lines, spans = otlp_json_lines(seed=4, spans=1_500)
    broken = [b'{"resourceSpans": [', b'{"resourceSpans": []}', b"[1, 2]"]
    path = tmp_path / "traces.jsonl"
    path.write_bytes(b"\n".join(lines[:5] + broken + lines[5:]) + b"\n")

    result = invoke(cfg, "import", str(path))
    assert result.exit_code == 4, result.output  # imported, with lines skipped
    assert f"imported {spans:,} spans" in result.output
    assert "3 failures" in result.output

    (run,) = RunStore(cfg.data_dir).list(kind="import")
    assert (run["state"], run["messages"], run["spans"], run["failures"]) == (
        "finished",
        len(lines),
        spans,
        3,
    )
    assert run["stored"] is None and run["duplicates"] is None  # the importer cannot see those
    assert run["failure_reasons"] == {"invalid_value": 2, "no_spans": 1}, run["failure_reasons"]
    assert any(s.startswith("line 6:") for s in run["failure_samples"]), run["failure_samples"]
    assert any(s.startswith("line 8:") for s in run["failure_samples"]), run["failure_samples"]

    shown = invoke(cfg, "runs", "show", run["run_id"], "--json")
    assert orjson.loads(shown.output)["run_id"] == run["run_id"]
    listed = invoke(cfg, "runs", "list", "--json")
    assert [orjson.loads(line)["run_id"] for line in listed.output.splitlines()] == [run["run_id"]]
    assert "import" in invoke(cfg, "runs", "list").output

    run_worker_over(cfg, tmp_path / "w1.log", [])
    counts = stored(cfg)
    assert counts == {"acme": (spans, spans)}
    # The same file again: the topic holds every request twice, the store each span once.
    assert invoke(cfg, "import", str(path)).exit_code == 4
    run_worker_over(cfg, tmp_path / "w2.log", [])
    assert stored(cfg) == counts
    assert len(RunStore(cfg.data_dir).list(kind="import")) == 2


def test_single_document_and_strict_mode(pipeline_settings: Settings, tmp_path: Path) -> None:
    cfg = pipeline_settings
    lines, _ = otlp_json_lines(seed=6, spans=200, per_request=1_000)
    assert len(lines) == 1
    doc = tmp_path / "one.json"
    doc.write_bytes(orjson.dumps(orjson.loads(lines[0]), option=orjson.OPT_INDENT_2))
    result = invoke(cfg, "import", str(doc), "--tenant", "globex")
    assert result.exit_code == 0, result.output
    records = read_topic(cfg, cfg.topics.input)
    assert len(records) == 1
    assert (cfg.tenant_header, b"globex") in list(records[0].headers)

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(lines[0] + b"\nnot json\n" + lines[0] + b"\n")
    result = invoke(cfg, "import", str(bad), "--strict")
    assert result.exit_code == 1
    assert "error:" in result.output and "line 2" in result.output
    failed = RunStore(cfg.data_dir).list(kind="import", state="failed")
    assert len(failed) == 1 and failed[0]["messages"] == 1

    missing = invoke(cfg, "import", str(tmp_path / "nope.jsonl"))
    assert missing.exit_code == 1 and "no such file" in missing.output


def test_rate_limit_paces_the_spans(pipeline_settings: Settings, tmp_path: Path) -> None:
    cfg = pipeline_settings
    lines, spans = otlp_json_lines(seed=7, spans=600, per_request=5)
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"\n".join(lines))
    rate = spans / 2.0  # two seconds' worth
    started = time.monotonic()
    run, _ = import_file(cfg, path, ImportOptions(rate=rate))
    elapsed = time.monotonic() - started
    assert run.counts.spans == spans
    # The last request may leave once the budget before it is spent: >= (spans - last) / rate.
    assert elapsed >= 1.5, elapsed


class DelayedProxy:
    """A TCP port that refuses connections until ``open()``, then forwards to the broker."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        with contextlib.closing(socket.socket()) as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._server: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._sockets: list[socket.socket] = []
        self._stop = threading.Event()

    def open(self) -> None:
        server = socket.create_server(("127.0.0.1", self.port))
        server.settimeout(0.2)
        self._server = server
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        assert self._server is not None
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:  # closed by close()
                return
            upstream = socket.create_connection(self.target)
            self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._server is not None:
            self._server.close()
        for sock in self._sockets:
            sock.close()


@pytest.fixture
def proxy(kafka_brokers: str) -> Iterator[DelayedProxy]:
    host, port = kafka_brokers.split(",", 1)[0].rsplit(":", 1)
    p = DelayedProxy((host, int(port)))
    yield p
    p.close()


def test_unreachable_broker_is_retried_with_backoff(
    pipeline_settings: Settings, tmp_path: Path, proxy: DelayedProxy
) -> None:
    """Nothing listens at first (a real refused connection); the import waits it out."""
    lines, spans = otlp_json_lines(seed=9, spans=100)
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"\n".join(lines))
    cfg = pipeline_settings.model_copy(update={"brokers": f"127.0.0.1:{proxy.port}"})
    timer = threading.Timer(2.0, proxy.open)
    timer.start()
    try:
        run, importer = import_file(
            cfg, path, ImportOptions(retries=10, backoff_base_s=0.2, backoff_max_s=1.0)
        )
    finally:
        timer.cancel()
    assert importer.retries_used >= 1
    assert run.counts.spans == spans
    assert RunStore(cfg.data_dir).get(run.run_id)["state"] == "finished"  # type: ignore[index]

    # Retries exhausted: a clear, retriable error, and the run is recorded as failed.
    dead = pipeline_settings.model_copy(update={"brokers": "127.0.0.1:1"})
    started = time.monotonic()
    with pytest.raises(BrokerError, match="after 3 attempt"):
        import_file(dead, path, ImportOptions(retries=2, backoff_base_s=0.2, backoff_max_s=0.4))
    assert time.monotonic() - started >= 0.3  # two backoff waits of at least half their ceiling
    assert RunStore(dead.data_dir).list(state="failed")[0]["failure_reasons"] == {"run_failed": 1}


def test_produce_is_recorded_as_a_run(pipeline_settings: Settings) -> None:
    cfg = pipeline_settings
    result = invoke(cfg, "produce", "-n", "300", "--tenants", "acme")
    assert result.exit_code == 0, result.output
    (run,) = RunStore(cfg.data_dir).list(kind="produce")
    assert (run["state"], run["source"]) == ("finished", cfg.topics.input)
    assert f"produced {run['spans']:,} spans in {run['messages']:,} messages" in result.output
    assert run["spans"] >= 300 and run["failures"] == 0  # whole traces: a few more than asked
