"""Minimal Kafka wire-protocol metadata probe: is a local node serving, and which brokers it sees."""

from __future__ import annotations

import dataclasses
import socket
import struct


@dataclasses.dataclass(frozen=True)
class Metadata:
    cluster_id: str | None
    controller_id: int
    broker_ids: frozenset[int]


# Minimal Kafka wire protocol: one MetadataRequest v7 (empty topic list), enough
# to prove the node serves requests and to see which brokers are registered.
_METADATA_API_KEY = 3
_METADATA_VERSION = 7
_PROBE_CLIENT_ID = b"betrace-dev-kafka-probe"


def fetch_metadata(host: str, port: int, timeout: float) -> Metadata:
    """Raises OSError (incl. timeouts and protocol errors) if not answered."""
    correlation_id = 1
    request = (
        struct.pack(
            ">hhih",
            _METADATA_API_KEY,
            _METADATA_VERSION,
            correlation_id,
            len(_PROBE_CLIENT_ID),
        )
        + _PROBE_CLIENT_ID
        + struct.pack(">ib", 0, 0)  # topics: [], allow_auto_topic_creation: false
    )
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(struct.pack(">i", len(request)) + request)
        (size,) = struct.unpack(">i", _recv_exact(sock, 4))
        if not 0 < size < 10_000_000:
            msg = f"bad Kafka response size {size}"
            raise OSError(msg)
        payload = _recv_exact(sock, size)
    try:
        return _parse_metadata(payload, correlation_id)
    except (struct.error, IndexError, UnicodeDecodeError) as exc:
        msg = f"unparsable Kafka metadata response: {exc}"
        raise OSError(msg) from exc


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            msg = "connection closed by the Kafka node"
            raise ConnectionError(msg)
        buf += chunk
    return bytes(buf)


def _parse_metadata(payload: bytes, correlation_id: int) -> Metadata:
    offset = 0

    def read(fmt: str) -> int:
        nonlocal offset
        (value,) = struct.unpack_from(fmt, payload, offset)
        offset += struct.calcsize(fmt)
        return int(value)

    def read_string() -> str | None:
        nonlocal offset
        length = read(">h")
        if length < 0:
            return None
        value = payload[offset : offset + length].decode()
        offset += length
        return value

    if read(">i") != correlation_id:
        msg = "Kafka response has an unexpected correlation id"
        raise OSError(msg)
    read(">i")  # throttle_time_ms
    broker_ids = set()
    for _ in range(read(">i")):
        broker_ids.add(read(">i"))  # node_id
        read_string()  # host
        read(">i")  # port
        read_string()  # rack
    cluster_id = read_string()
    controller_id = read(">i")
    return Metadata(cluster_id=cluster_id, controller_id=controller_id, broker_ids=frozenset(broker_ids))
