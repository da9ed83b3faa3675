"""Opaque keyset cursors over ``(timestamp, id)`` (design doc 004, BR-STORAGE-035).

A cursor is URL-safe base64 of a small JSON document holding the last row's
key and a fingerprint of the query's filters; a cursor presented with other
filters, or one that does not decode, is a 400. Rows are ordered by an
immutable, strictly increasing ingest timestamp and then the id, so paging
while writes continue neither repeats nor skips a row: rows added meanwhile
always sort after every existing cursor.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping

import orjson

from betrace.errors import BetraceError

VERSION = 1


class CursorError(BetraceError):
    """A cursor is malformed or belongs to another query (HTTP 400)."""


def fingerprint(filters: Mapping[str, object]) -> str:
    """A short digest of the filters a cursor is valid for."""
    blob = orjson.dumps({k: filters[k] for k in sorted(filters)})
    return hashlib.sha256(blob).hexdigest()[:16]


def encode(key: tuple[int, str], filters: Mapping[str, object]) -> str:
    doc = {"v": VERSION, "t": key[0], "i": key[1], "q": fingerprint(filters)}
    return base64.urlsafe_b64encode(orjson.dumps(doc)).decode().rstrip("=")


def decode(cursor: str, filters: Mapping[str, object]) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        doc = orjson.loads(raw)
    except (binascii.Error, ValueError, orjson.JSONDecodeError):
        msg = "cursor is not a cursor this API issued"
        raise CursorError(msg) from None
    if not isinstance(doc, dict) or doc.get("v") != VERSION:
        msg = "cursor is not a cursor this API issued"
        raise CursorError(msg)
    ts, ident = doc.get("t"), doc.get("i")
    if not isinstance(ts, int) or isinstance(ts, bool) or not isinstance(ident, str) or len(ident) > 64:
        msg = "cursor is not a cursor this API issued"
        raise CursorError(msg)
    if doc.get("q") != fingerprint(filters):
        msg = "cursor belongs to a query with other filters; start again without a cursor"
        raise CursorError(msg)
    return ts, ident
