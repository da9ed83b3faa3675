"""Value framing for Redis: a 1-byte header says whether the body is zlib-compressed.

``0x00`` + raw bytes, or ``0x01`` + a zlib stream. Only values larger than the
threshold are compressed, and only kept compressed when that saves space, so
small values (most API key and trace entries) cost no CPU.
"""

from __future__ import annotations

import zlib

from betrace.errors import BetraceError

RAW = 0x00
ZLIB = 0x01
_LEVEL = 1  # fast: the values are JSON, level 1 already shrinks them 3-10x


class CacheValueError(BetraceError):
    """A cached value has an unknown header or a corrupt body (treated as a miss)."""


def encode(value: bytes, threshold: int) -> bytes:
    """Frame ``value``; compress it when it is over ``threshold`` bytes and that helps."""
    if len(value) > threshold:
        packed = zlib.compress(value, _LEVEL)
        if len(packed) < len(value):
            return bytes((ZLIB,)) + packed
    return bytes((RAW,)) + value


def decode(framed: bytes) -> bytes:
    """The original bytes of a framed value; :class:`CacheValueError` if it is not one."""
    if not framed:
        msg = "empty cache value"
        raise CacheValueError(msg)
    head = framed[0]
    if head == RAW:
        return framed[1:]
    if head == ZLIB:
        try:
            return zlib.decompress(framed[1:])
        except zlib.error as exc:
            msg = f"corrupt compressed cache value: {exc}"
            raise CacheValueError(msg) from None
    msg = f"unknown cache value header 0x{head:02x}"
    raise CacheValueError(msg)


def is_compressed(framed: bytes) -> bool:
    return bool(framed) and framed[0] == ZLIB
