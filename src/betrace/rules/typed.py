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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


_Thunk = Callable[[], Any]
_FIELDS = ("num", "text", "flag", "present", "elements")


class Typed:
    """One value per span, split by JSON type; see the module docstring.

    Each part may be given as a thunk (:meth:`deferred`) and is then computed
    on first use: a rule comparing ``http.status_code`` with a number never
    pays for the string, boolean and presence columns of that attribute.
    """

    __slots__ = ("_lock", "_thunks", "_values", "raw")

    def __init__(
        self,
        num: pa.Array | None = None,
        text: pa.Array | None = None,
        flag: pa.Array | None = None,
        present: pa.Array | None = None,
        elements: Elements | None = None,
    ) -> None:
        self._values: dict[str, Any] = {
            "num": num, "text": text, "flag": flag, "present": present, "elements": elements,
        }  # fmt: skip
        self._thunks: dict[str, _Thunk] = {}
        self._lock = threading.Lock()
        #: The JSON text of each value as DuckDB renders it (:func:`decode` sets it), if known.
        self.raw: pa.Array | None = None

    @classmethod
    def deferred(cls, **thunks: _Thunk) -> Typed:
        """A Typed whose parts are computed by ``thunks`` (by part name) when first read."""
        typed = cls()
        unknown = set(thunks) - set(_FIELDS)
        if unknown:
            msg = f"unknown Typed parts {sorted(unknown)}"
            raise TypeError(msg)
        typed._thunks = dict(thunks)
        return typed

    def _get(self, name: str) -> Any:
        if self._thunks:
            with self._lock:
                thunk = self._thunks.pop(name, None)
                if thunk is not None:
                    self._values[name] = thunk()
        return self._values[name]

    @property
    def num(self) -> pa.Array | None:
        """JSON numbers as float64 (or a numeric intrinsic); null elsewhere."""
        result: pa.Array | None = self._get("num")
        return result

    @property
    def text(self) -> pa.Array | None:
        result: pa.Array | None = self._get("text")
        return result

    @property
    def flag(self) -> pa.Array | None:
        result: pa.Array | None = self._get("flag")
        return result

    @property
    def present(self) -> pa.Array | None:
        """Where the value exists and is not JSON null; ``None`` means everywhere."""
        result: pa.Array | None = self._get("present")
        return result

    @property
    def elements(self) -> Elements | None:
        result: Elements | None = self._get("elements")
        return result


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


def _query_column(column: pa.Array, sql: str, *, with_index: bool = False) -> pa.Table:
    con = connection()
    source = {"j": column, "i": _arange(len(column))} if with_index else {"j": column}
    con.register("betrace_json", pa.table(source))
    try:
        return con.sql(sql).to_arrow_table()
    finally:
        con.unregister("betrace_json")


def _may_contain(strings: pa.Array, needle: bytes) -> bool:
    """False only if no value of ``strings`` contains ``needle``: one memchr-speed scan
    of the data buffer instead of a per-value kernel (escapes are rare in attributes)."""
    buffers = strings.buffers()
    data = buffers[2] if len(buffers) > 2 else None
    if data is None:
        return False
    return memoryview(data).tobytes().find(needle) >= 0


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


def canonical_json(text: str) -> str | None:
    """How DuckDB renders the JSON string ``text`` (:func:`extract_raw`), if that is unique.

    DuckDB re-serialises extracted values, decoding every escape and escaping
    only quotes, backslashes and control characters; for a string without
    those the rendering is ``"text"``, so ``raw == canonical_json(s)`` is
    exactly ``text == s`` without slicing the quotes off every value.
    """
    if any(c in '"\\' or c < " " for c in text):
        return None
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate: no JSON value holds it
        return None
    return f'"{text}"'


def decode(raw: pa.Array, *, with_elements: bool = True) -> Typed:
    """Split raw JSON values into a :class:`Typed` (arrays into ``elements``), lazily per part."""
    raw_bytes = raw.view(pa.binary())
    firsts: list[pa.Array] = []

    def first() -> pa.Array:
        # The first byte tells the JSON type; byte slicing is safe as it is ASCII.
        if not firsts:
            firsts.append(pc.binary_slice(raw_bytes, 0, 1))
        return firsts[0]

    def text() -> pa.Array:
        is_str = pc.equal(first(), b'"')
        values = pc.if_else(is_str, pc.binary_slice(raw_bytes, 1, -1), pa.scalar(None, pa.binary()))
        values = values.view(pa.string())
        if not _may_contain(raw, b"\\"):
            return values
        escaped = pc.and_(is_str, pc.match_substring(raw, "\\")).fill_null(False)
        if pc.any(escaped).as_py():
            rows = pc.indices_nonzero(escaped)
            sql = "SELECT json_extract_string(j, '$') FROM betrace_json"
            sub = _query_column(pc.take(raw, rows), sql)
            values = pc.replace_with_mask(values, escaped, sub.column(0).combine_chunks())
        return values

    def num() -> pa.Array:
        try:
            values = pc.cast(raw, pa.float64())
        except pa.ArrowInvalid:
            values = None
        # Strings, arrays, objects, booleans and null do not parse as floats, so when all values
        # do, no type mask is needed; but NaN and Infinity, which DuckDB reads, are not numbers.
        if values is not None and pc.all(pc.is_finite(values)).as_py() is not False:
            return values
        is_num = pc.is_in(first(), value_set=_NUM_FIRST)
        return pc.cast(pc.if_else(is_num, raw, _NULL_STR), pa.float64())

    def flag() -> pa.Array:
        return pc.if_else(pc.equal(raw, "true"), True, pc.if_else(pc.equal(raw, "false"), False, _NULL_BOOL))

    def present() -> pa.Array:
        return pc.not_equal(raw, "null").fill_null(False)

    def elements() -> Elements | None:
        if not with_elements or not _may_contain(raw, b"["):
            return None
        is_array = pc.equal(first(), b"[").fill_null(False)
        if not pc.any(is_array).as_py():
            return None
        rows = pc.indices_nonzero(is_array).cast(pa.int64())
        sub = _query_column(
            pc.take(raw, rows),
            "SELECT i, unnest(json_transform(j, '[\"JSON\"]')) FROM betrace_json",
            with_index=True,
        )
        element_rows = pc.take(rows, sub.column(0).combine_chunks())
        values = decode(sub.column(1).combine_chunks(), with_elements=False)
        return Elements(rows=element_rows, values=values)

    typed = Typed.deferred(num=num, text=text, flag=flag, present=present, elements=elements)
    typed.raw = raw
    return typed


def take(typed: Typed, indices: pa.Array) -> Typed:
    """Gather rows of ``typed`` (array elements are dropped: used for per-row lookups)."""

    def pick(part: Callable[[], pa.Array | None]) -> Callable[[], pa.Array | None]:
        def gather() -> pa.Array | None:
            arr = part()
            return None if arr is None else pc.take(arr, indices)

        return gather

    def present() -> pa.Array:
        picked = pick(lambda: typed.present)()
        return pc.is_valid(indices) if picked is None else picked.fill_null(False)

    return Typed.deferred(
        num=pick(lambda: typed.num),
        text=pick(lambda: typed.text),
        flag=pick(lambda: typed.flag),
        present=present,
        elements=lambda: None,
    )


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

    def present() -> pa.Array | None:
        return None if second.present is None else pc.or_(has, second.present)

    return Typed.deferred(
        num=lambda: pick(first.num, second.num),
        text=lambda: pick(first.text, second.text),
        flag=lambda: pick(first.flag, second.flag),
        present=present,
        elements=lambda: first.elements,
    )
