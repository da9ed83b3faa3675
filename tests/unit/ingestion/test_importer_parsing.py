"""The importer's reading, validation and JSON→protobuf conversion, on real files."""

from __future__ import annotations

import base64
import random
from pathlib import Path

import orjson
from google.protobuf import json_format

from betrace.config import load_settings
from betrace.ingestion.importer import Malformed, Request, RequestReader, backoff_s, json_to_proto
from betrace.streams.otlp import OtlpDecoder, Record
from betrace.workload.generator import TraceGenerator
from betrace.workload.otlp import encode_request


def request_json(seed: int = 1, spans: int = 50) -> tuple[bytes, bytes]:
    """One request as OTLP/JSON (hex ids) and as the protobuf it was made from."""
    traces = list(TraceGenerator(tenants=("acme",), violation_rate=0.2, seed=seed).traces(spans))
    proto = encode_request(traces)
    doc = json_format.MessageToDict(proto)
    for rs in doc["resourceSpans"]:
        for ss in rs["scopeSpans"]:
            for span in ss["spans"]:
                for name in ("traceId", "spanId", "parentSpanId"):
                    if name in span:
                        span[name] = base64.b64decode(span[name]).hex()
    return orjson.dumps(doc), proto.SerializeToString()


def test_json_to_proto_decodes_to_the_same_spans() -> None:
    raw, proto = request_json()
    decoder = OtlpDecoder(encoding="otlp_proto", tenant_header="h", default_tenant="d")
    converted = decoder.decode([Record(json_to_proto(raw))]).spans
    original = decoder.decode([Record(proto)]).spans
    assert converted.num_rows == original.num_rows > 0
    assert converted.to_pylist() == original.to_pylist()


def test_reader_reports_malformed_lines_by_number(tmp_path: Path) -> None:
    good, _ = request_json()
    path = tmp_path / "t.jsonl"
    bad_id = b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"zz","spanId":"01","name":"x"}]}]}]}'
    path.write_bytes(b"\n".join([good, b"", b"{nope", b'{"resourceSpans": 5}', b"{}", bad_id, good]) + b"\n")
    items = list(RequestReader(path, load_settings(), tenant=None))
    kinds = [(i.line, type(i).__name__, getattr(i, "reason", None)) for i in items]
    assert kinds == [
        (1, "Request", None),
        (3, "Malformed", "invalid_value"),
        (4, "Malformed", "invalid_value"),
        (5, "Malformed", "no_spans"),
        (6, "Malformed", "no_spans"),
        (7, "Request", None),
    ]
    assert all(isinstance(i, Malformed) and i.detail for i in items[1:5])


def test_a_pretty_printed_single_document(tmp_path: Path) -> None:
    raw, _ = request_json(spans=30)
    path = tmp_path / "one.json"
    path.write_bytes(orjson.dumps(orjson.loads(raw), option=orjson.OPT_INDENT_2))
    (item,) = list(RequestReader(path, load_settings(), tenant="acme"))
    assert isinstance(item, Request) and item.spans >= 30
    json_topic = load_settings(topics={"input_encoding": "otlp_json"})
    (as_json,) = list(RequestReader(path, json_topic, tenant=None))
    assert isinstance(as_json, Request) and orjson.loads(as_json.value) == orjson.loads(raw)


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    rng = random.Random(1)
    for attempt in range(8):
        ceiling = min(2.0, 0.1 * 2**attempt)
        waits = [backoff_s(attempt, 0.1, 2.0, rng) for _ in range(50)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits)
        assert len(set(waits)) > 1
