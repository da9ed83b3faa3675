"""Properties of the OTLP decoder: it never crashes and accounts for every record."""

from __future__ import annotations

import json
import re
from typing import Any

import orjson
import pyarrow as pa
from google.protobuf.message import DecodeError as ProtobufDecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from betrace.streams.otlp import DecodedBatch, OtlpDecoder, Record
from betrace.workload.generator import TraceGenerator
from betrace.workload.otlp import batch_messages

HEADER = "X-Scope-OrgID"
HEX32 = re.compile(r"^[0-9a-f]{32}$")
HEX16 = re.compile(r"^[0-9a-f]{16}$")
TENANT = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
# derandomize: the same examples on every run, so the suite stays deterministic;
# no example database: nothing is written into the working tree.
FAST = settings(
    max_examples=300,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
VALID = [
    m.value
    for m in batch_messages(TraceGenerator(tenants=("acme",), seed=11).traces(40), spans_per_message=20)
]

headers = st.lists(
    st.tuples(st.sampled_from([HEADER, "traceparent", "x"]), st.binary(max_size=70)), max_size=3
)
keys = st.one_of(st.none(), st.binary(max_size=40), st.sampled_from([b"ab" * 16, bytes(range(16))]))


def decoder(encoding: str) -> OtlpDecoder:
    return OtlpDecoder(encoding=encoding, tenant_header=HEADER, default_tenant="default")


def assert_rows_valid(spans: pa.Table) -> None:
    for row in spans.select(["tenant", "trace_id", "span_id"]).to_pylist():
        assert HEX32.match(row["trace_id"])
        assert row["trace_id"] != "0" * 32
        assert HEX16.match(row["span_id"])
        assert row["span_id"] != "0" * 16
        assert TENANT.match(row["tenant"])


def span_ids_of(value: bytes) -> list[tuple[bytes, bytes]] | None:
    """Independent oracle: the (trace id, span id) pairs protobuf itself sees."""
    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(value)
    except (ProtobufDecodeError, RuntimeError):
        return None
    return [
        (span.trace_id, span.span_id)
        for rs in request.resource_spans
        for ss in rs.scope_spans
        for span in ss.spans
    ]


def check_accounting(record: Record, batch: DecodedBatch) -> None:
    """Either every span of the record is a row, or the record is a dead letter."""
    assert batch.records == 1
    assert len(batch.dead_letters) <= 1
    assert_rows_valid(batch.spans)
    if not batch.dead_letters:
        assert record.value
        pairs = span_ids_of(record.value)
        assert pairs is not None
        assert batch.spans.num_rows == len(pairs)
        return
    [dead] = batch.dead_letters
    assert dead.record is record
    assert dead.reason in {"invalid_key", "invalid_value", "invalid_span"}
    if dead.reason == "invalid_span":
        assert batch.spans.num_rows < len(span_ids_of(record.value or b"") or ())
    else:
        assert batch.spans.num_rows == 0


@FAST
@given(value=st.binary(max_size=400), key=keys, hdrs=headers)
def test_proto_arbitrary_bytes_are_decoded_or_dead_lettered(
    value: bytes, key: bytes | None, hdrs: list[tuple[str, bytes]]
) -> None:
    record = Record(value, key=key, headers=hdrs)
    check_accounting(record, decoder("otlp_proto").decode([record]))


@FAST
@given(junk=st.lists(st.binary(max_size=200), max_size=5), data=st.data())
def test_valid_records_survive_among_garbage(junk: list[bytes], data: st.DataObject) -> None:
    records = [Record(v, offset=i) for i, v in enumerate(junk)]
    good = [Record(v, offset=100 + i) for i, v in enumerate(VALID)]
    mixed = data.draw(st.permutations(records + good))
    batch = decoder("otlp_proto").decode(mixed)
    assert batch.records == len(mixed)
    assert all(any(d.record is r for r in records) for d in batch.dead_letters)
    expected = sum(len(span_ids_of(r.value or b"") or ()) for r in good)
    assert batch.spans.num_rows >= expected
    assert_rows_valid(batch.spans)


@FAST
@given(value=st.binary(max_size=400), key=keys, hdrs=headers)
def test_json_arbitrary_bytes_are_decoded_or_dead_lettered(
    value: bytes, key: bytes | None, hdrs: list[tuple[str, bytes]]
) -> None:
    record = Record(value, key=key, headers=hdrs)
    batch = decoder("otlp_json").decode([record])
    assert batch.records == 1
    assert_rows_valid(batch.spans)
    assert all(d.record is record for d in batch.dead_letters)
    if not batch.dead_letters:
        # Neither rows nor a dead letter is only fine for a JSON object without spans.
        assert isinstance(orjson.loads(value), dict)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
trace_ids = st.one_of(st.just("5b8efff798038103d269b633813fc60c"), json_values)
span_ids = st.one_of(st.just("eee19b7ec3c1b174"), json_values)
span_docs = st.fixed_dictionaries(
    {"traceId": trace_ids, "spanId": span_ids},
    optional={
        "name": json_values,
        "kind": st.one_of(st.sampled_from(["SPAN_KIND_SERVER", 3]), json_values),
        "status": json_values,
        "startTimeUnixNano": st.one_of(st.just("123"), json_values),
        "parentSpanId": json_values,
        "attributes": st.one_of(
            st.lists(st.fixed_dictionaries({"key": st.text(max_size=5), "value": json_values})),
            json_values,
        ),
    },
)


@FAST
@given(
    resource=json_values,
    spans=st.lists(span_docs, max_size=4),
    shape=st.sampled_from(["object", "spans-any", "scope-any"]),
    filler=json_values,
)
def test_json_arbitrary_documents_never_crash(
    resource: Any, spans: list[dict[str, Any]], shape: str, filler: Any
) -> None:
    scope: Any = {"spans": spans} if shape != "spans-any" else {"spans": filler}
    scopes: Any = [scope] if shape != "scope-any" else filler
    doc = {"resourceSpans": [{"resource": resource, "scopeSpans": scopes}]}
    record = Record(json.dumps(doc).encode())  # stdlib json: integers of any size
    batch = decoder("otlp_json").decode([record])
    assert_rows_valid(batch.spans)
    reasons = [d.reason for d in batch.dead_letters]
    assert reasons in ([], ["invalid_value"], ["invalid_span"])
    if reasons == ["invalid_value"]:
        assert batch.spans.num_rows == 0


# Byte-level corruption of real requests reaches the field-range checks (timestamps,
# enums, attribute nesting) that random bytes almost never do.
@FAST
@given(
    base=st.sampled_from(VALID),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_proto_corrupted_requests_are_decoded_or_dead_lettered(
    base: bytes, edits: list[tuple[int, int]]
) -> None:
    value = bytearray(base)
    for position, byte in edits:
        value[position % len(value)] = byte
    record = Record(bytes(value))
    check_accounting(record, decoder("otlp_proto").decode([record]))
