"""Codecs for internal topics: Arrow IPC stream bytes and JSON signals."""

from __future__ import annotations

from typing import Any

import orjson
import pyarrow as pa

from betrace.errors import ValueDecodeError

# LZ4 keeps broker bytes down for a few percent of CPU; Arrow buffers compress well.
_WRITE_OPTIONS = pa.ipc.IpcWriteOptions(compression="lz4")


def table_to_ipc(table: pa.Table) -> bytes:
    """Serialise a table as one Arrow IPC stream."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=_WRITE_OPTIONS) as writer:
        writer.write_table(table)
    data: bytes = sink.getvalue().to_pybytes()
    return data


def ipc_to_table(data: bytes) -> pa.Table:
    """Read a table written by :func:`table_to_ipc`."""
    try:
        with pa.ipc.open_stream(data) as reader:
            return reader.read_all()
    except (pa.ArrowException, OSError) as exc:  # corrupt bytes raise several Arrow error kinds
        msg = f"not an Arrow IPC stream: {exc}"
        raise ValueDecodeError(msg) from None


def dumps(doc: Any) -> bytes:
    """JSON encoding used on every JSON topic (orjson, UTC datetimes)."""
    return orjson.dumps(doc, option=orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC)


def loads(data: bytes) -> Any:
    """Parse a JSON topic value."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        msg = f"not valid JSON: {exc}"
        raise ValueDecodeError(msg) from None
