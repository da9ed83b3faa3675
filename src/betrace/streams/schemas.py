"""Arrow schemas of the columnar batches that travel between stages.

Every internal topic carries Arrow IPC record batches of ``SPAN_SCHEMA``; the
per-span Python work (protobuf field access) happens once, at ingest.
"""

from __future__ import annotations

import pyarrow as pa

#: One row per span. Ids are lower-case hex so that users can paste them
#: from any OpenTelemetry tool; attributes are JSON objects so that DuckDB
#: and the rule engine can read typed values without a per-span Python step.
SPAN_SCHEMA = pa.schema(
    [
        pa.field("tenant", pa.string(), nullable=False),
        pa.field("trace_id", pa.string(), nullable=False),
        pa.field("span_id", pa.string(), nullable=False),
        pa.field("parent_span_id", pa.string()),
        pa.field("name", pa.string(), nullable=False),
        pa.field("service", pa.string()),
        pa.field("kind", pa.int8(), nullable=False),
        pa.field("status_code", pa.int8(), nullable=False),
        pa.field("start_ns", pa.int64(), nullable=False),
        pa.field("end_ns", pa.int64(), nullable=False),
        pa.field("attributes", pa.string(), nullable=False),
        pa.field("resource_attributes", pa.string(), nullable=False),
        # Kafka timestamp of the source message, for produce-to-signal latency.
        pa.field("produced_ms", pa.int64(), nullable=False),
    ]
)

SPAN_COLUMNS: tuple[str, ...] = tuple(SPAN_SCHEMA.names)

#: Version of the JSON signal document on the signals topic (docs/signals.md).
SIGNAL_SCHEMA_VERSION = 1
