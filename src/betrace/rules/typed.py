"""Typed span values: one attribute or intrinsic as parallel Arrow columns.

Span attributes are JSON with per-span types, so one attribute key becomes a
:class:`Typed` holding a float column (JSON numbers), a string column (JSON
strings) and a boolean column (JSON booleans), each null where the span's
value has another type or is missing. Comparisons pick the column matching
the literal's type, which gives "no implicit coercion" semantics: ``amount >
1000`` is false for a span whose ``amount`` is the string ``"1500"``.

The JSON is read by DuckDB (``json_transform``) once per batch for all keys
that the compiled rules of the tenant need; no per-span Python parsing.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import duckdb
import orjson
import pyarrow as pa
import pyarrow.compute as pc

_NUM_FIRST = pa.array([c.encode() for c in "-0123456789"], pa.binary())
_NULL_STR = pa.scalar(None, pa.string())
_NULL_BOOL = pa.scalar(None, pa.bool_())
_local = threading.local()


@dataclass(frozen=True, slots=True)
class Elements:
    """The elements of array-valued attributes, flattened.

    ``rows`` gives, for each element, the batch row it belongs to.
    """

    rows: pa.Array
    values: Typed


@dataclass(frozen=True, slots=True)
class Typed:
    """One value per span, split by JSON type; see the module docstring."""

    num: pa.Array | None = None
    text: pa.Array | None = None
    flag: pa.Array | None = None
    #: Where the value exists and is not JSON null; ``None`` means everywhere.
    present: pa.Array | None = None
    elements: Elements | None = None


def connection() -> duckdb.DuckDBPyConnection:
    """A DuckDB connection private to the calling thread (connections are not thread-safe)."""
    con: duckdb.DuckDBPyConnection | None = getattr(_local, "con", None)
    if con is None:
        # One thread: the evaluate stage parallelises by process, one per core.
        con = duckdb.connect(config={"threads": 1})
        _local.con = con
    return con


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _query_column(column: pa.Array, sql: str) -> pa.Table:
    con = connection()
    con.register("betrace_json", pa.table({"j": column, "i": _arange(len(column))}))
    try:
        return con.sql(sql).to_arrow_table()
    finally:
        con.unregister("betrace_json")


def _arange(n: int) -> pa.Array:
    return pc.indices_nonzero(pa.repeat(pa.scalar(True), n)).cast(pa.int64())


def _case_groups(keys: list[str]) -> list[list[str]]:
    # DuckDB struct field names are case-insensitive: keys that differ only
    # in case must go into different json_transform calls.
    groups: list[list[str]] = []
    seen: list[set[str]] = []
    for key in keys:
        for group, lower in zip(groups, seen, strict=True):
            if key.lower() not in lower:
                group.append(key)
                lower.add(key.lower())
                break
        else:
            groups.append([key])
            seen.append({key.lower()})
    return groups


def extract_raw(column: pa.Array, keys: list[str]) -> dict[str, pa.Array]:
    """Return, per key, the raw JSON text of that member of each object in ``column``."""
    out: dict[str, pa.Array] = {}
    for group in _case_groups(keys):
        spec = _sql_literal(orjson.dumps(dict.fromkeys(group, "JSON")).decode())
        # The keys reach SQL only inside a JSON document quoted by _sql_literal.
        try:
            sql = f"SELECT json_transform(j, {spec}) FROM betrace_json"  # noqa: S608
            table = _query_column(column, sql)
        except duckdb.Error:
            # A malformed document fails the whole call; retry skipping invalid ones.
            sql = (
                f"SELECT CASE WHEN json_valid(j) THEN json_transform(j, {spec}) END "  # noqa: S608
                "FROM betrace_json"
            )
            table = _query_column(column, sql)
        struct = table.column(0).combine_chunks()
        out.update(zip(group, struct.flatten(), strict=True))
    return out


def decode(raw: pa.Array, *, with_elements: bool = True) -> Typed:
    """Split raw JSON values into a :class:`Typed` (arrays into ``elements``)."""
    # The first byte tells the JSON type; byte slicing is safe as it is ASCII.
    raw_bytes = raw.view(pa.binary())
    first = pc.binary_slice(raw_bytes, 0, 1)
    is_str = pc.equal(first, b'"')
    text = pc.if_else(is_str, pc.binary_slice(raw_bytes, 1, -1), pa.scalar(None, pa.binary()))
    text = text.view(pa.string())
    escaped = pc.and_(is_str, pc.match_substring(raw, "\\")).fill_null(False)
    if pc.any(escaped).as_py():
        rows = pc.indices_nonzero(escaped)
        sql = "SELECT json_extract_string(j, '$') FROM betrace_json"
        sub = _query_column(pc.take(raw, rows), sql)
        text = pc.replace_with_mask(text, escaped, sub.column(0).combine_chunks())
    is_num = pc.is_in(first, value_set=_NUM_FIRST)
    num = pc.cast(pc.if_else(is_num, raw, _NULL_STR), pa.float64())
    flag = pc.if_else(pc.equal(raw, "true"), True, pc.if_else(pc.equal(raw, "false"), False, _NULL_BOOL))
    present = pc.not_equal(raw, "null").fill_null(False)
    elements = None
    is_array = pc.equal(first, b"[").fill_null(False)
    if with_elements and pc.any(is_array).as_py():
        rows = pc.indices_nonzero(is_array).cast(pa.int64())
        sub = _query_column(
            pc.take(raw, rows),
            "SELECT i, unnest(json_transform(j, '[\"JSON\"]')) FROM betrace_json",
        )
        element_rows = pc.take(rows, sub.column(0).combine_chunks())
        values = decode(sub.column(1).combine_chunks(), with_elements=False)
        elements = Elements(rows=element_rows, values=values)
    return Typed(num=num, text=text, flag=flag, present=present, elements=elements)


def take(typed: Typed, indices: pa.Array) -> Typed:
    """Gather rows of ``typed`` (array elements are dropped: used for per-row lookups)."""

    def pick(arr: pa.Array | None) -> pa.Array | None:
        return None if arr is None else pc.take(arr, indices)

    present = pick(typed.present)
    present = pc.is_valid(indices) if present is None else present.fill_null(False)
    return Typed(pick(typed.num), pick(typed.text), pick(typed.flag), present)


def coalesce(first: Typed, second: Typed) -> Typed:
    """Values of ``first`` where present, else of ``second`` (TraceQL's unscoped ``.attr``)."""
    if first.present is None:
        return first
    has = first.present

    def pick(a: pa.Array | None, b: pa.Array | None) -> pa.Array | None:
        if a is None:
            return b if b is None else pc.if_else(has, pa.nulls(len(b), b.type), b)
        if b is None:
            return a
        return pc.if_else(has, a, b)

    present = has if second.present is None else pc.or_(has, second.present)
    if second.present is None:
        present = None
    return Typed(
        pick(first.num, second.num),
        pick(first.text, second.text),
        pick(first.flag, second.flag),
        present,
        first.elements,
    )
