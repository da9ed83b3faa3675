"""Per-batch derived columns shared by every rule evaluated on the same table.

Evaluating 20 rules on one batch should parse the attribute JSON once, encode
trace ids once and resolve parent links once. :func:`context_for` therefore
keeps the :class:`BatchContext` of the last few tables (by identity), and
compiled rules register the attribute keys they read (:func:`register_keys`)
so that the first rule to touch the attributes extracts the keys of all the
tenant's rules in a single DuckDB pass.

Many keys are only read under a span name (``db.query.where(rows > 500)``
needs ``rows`` on ``db.query`` spans only). When all of a tenant's keys are
like that, they are extracted from just the spans with those names; values
outside those rows read as absent, which is exact because every such use
ANDs them with the name test. Once some key is read on any span (a TraceQL
filter), everything goes into that one pass over all spans instead: DuckDB's
cost is mostly parsing each document, not extracting one more key.
Attribute values are decoded lazily, part by part (:class:`~.typed.Typed`).
"""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc

from betrace.rules.model import Violation
from betrace.rules.typed import Elements, Typed, decode, extract_raw

Scope = Literal["span", "resource"]
#: An attribute read by a rule: scope, key, and the span name it is read under (None: any span).
KeyUse = tuple[Scope, str, str | None]
#: The span names an extraction covers; None: every span.
Rows = frozenset[str] | None
#: OTLP SpanKind and StatusCode enum names, indexed by their numeric values.
KIND_NAMES = ("unspecified", "internal", "server", "client", "producer", "consumer")
STATUS_NAMES = ("unset", "ok", "error")
#: Upper bound on parent-chain walks, so that a cyclic parent link in bad
#: data cannot loop forever.
MAX_TREE_DEPTH = 1024
_CACHE_SIZE = 4

_wanted: dict[tuple[str, Scope], Counter[tuple[str, str | None]]] = defaultdict(Counter)
_wanted_lock = threading.Lock()
_cache: list[BatchContext] = []
_cache_lock = threading.Lock()


def register_keys(tenant: str, keys: Iterable[KeyUse]) -> Callable[[], None]:
    """Record that a live compiled rule of ``tenant`` reads ``keys``; return the undo."""
    uses = list(keys)
    with _wanted_lock:
        for scope, key, within in uses:
            _wanted[tenant, scope][key, within] += 1

    def unregister() -> None:
        with _wanted_lock:
            for scope, key, within in uses:
                counter = _wanted[tenant, scope]
                counter[key, within] -= 1
                if counter[key, within] <= 0:
                    del counter[key, within]

    return unregister


def _covers(rows: Rows, within: str | None) -> bool:
    return rows is None or (within is not None and within in rows)


@dataclass(frozen=True, slots=True)
class _Raw:
    """Raw JSON values of one key on the rows of ``rows`` (all spans when None)."""

    rows: Rows
    values: pa.Array
    #: Per span: the index into ``values``, null outside ``rows``; None when ``values`` is per span.
    positions: pa.Array | None = None
    #: Per entry of ``values``: its span row (for array elements); None as above.
    span_rows: pa.Array | None = None


def _expand(typed: Typed, raw: _Raw) -> Typed:
    """Values decoded on ``raw``'s rows, back to one per span (absent elsewhere), lazily."""
    positions, span_rows = raw.positions, raw.span_rows
    assert positions is not None
    assert span_rows is not None

    def spread(part: Callable[[], pa.Array | None]) -> Callable[[], pa.Array | None]:
        def compute() -> pa.Array | None:
            values = part()
            return None if values is None else pc.take(values, positions)

        return compute

    def present() -> pa.Array:
        values = typed.present
        if values is None:
            return pc.is_valid(positions)
        return pc.take(values, positions).fill_null(False)

    def elements() -> Elements | None:
        inner = typed.elements
        if inner is None:
            return None
        return Elements(rows=pc.take(span_rows, inner.rows), values=inner.values)

    return Typed.deferred(
        num=spread(lambda: typed.num),
        text=spread(lambda: typed.text),
        flag=spread(lambda: typed.flag),
        present=present,
        elements=elements,
    )


def members(indices: pa.Array, size: int) -> pa.Array:
    """Mask of length ``size``, true at each position in ``indices`` (repeats and nulls allowed).

    The inverse permutation is valid exactly at the listed positions: one linear
    scatter, where ``is_in`` would hash every listed position as a value set.
    """
    if size == 0:
        return pa.array([], pa.bool_())
    if not pa.types.is_signed_integer(indices.type):
        indices = indices.cast(pa.int64())
    return pc.is_valid(pc.inverse_permutation(indices, max_index=size - 1, output_type=pa.int64()))


def context_for(table: pa.Table) -> BatchContext:
    """The shared :class:`BatchContext` of ``table`` (created on first use)."""
    with _cache_lock:
        for ctx in _cache:
            if ctx.table is table:
                return ctx
        ctx = BatchContext(table)
        _cache.insert(0, ctx)
        del _cache[_CACHE_SIZE:]
        return ctx


@dataclass(frozen=True, slots=True)
class Grouping:
    """Assignment of spans to groups: traces by default, or ``by(...)`` groups."""

    ids: pa.Array
    size: int


class BatchContext:
    """Lazily computed, cached columns of one span table (see module docstring)."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table
        self.n = table.num_rows
        encoded = pc.dictionary_encode(table.column("trace_id").combine_chunks())
        self.codes: pa.Array = encoded.indices
        self.trace_ids: pa.Array = encoded.dictionary
        self.ntraces = len(self.trace_ids)
        self.traces = Grouping(self.codes, self.ntraces)
        self._columns: dict[str, pa.Array] = {}
        self._memo: dict[object, object] = {}
        self._raw: dict[tuple[Scope, str], _Raw] = {}
        self._typed: dict[tuple[Scope, str], tuple[Rows, Typed]] = {}
        self._lock = threading.RLock()
        self.all_false: pa.Array = pa.repeat(pa.scalar(False), self.n)
        self.all_true: pa.Array = pa.repeat(pa.scalar(True), self.n)

    # -- columns -------------------------------------------------------------

    def column(self, name: str) -> pa.Array:
        col = self._columns.get(name)
        if col is None:
            chunked = self.table.column(name)
            # combine_chunks copies even a single chunk; most batches have one.
            col = chunked.chunk(0) if chunked.num_chunks == 1 else chunked.combine_chunks()
            self._columns[name] = col
        return col

    def memo(self, key: object, compute: Callable[[], object]) -> object:
        """Cache ``compute()`` under ``key`` for the lifetime of the batch."""
        with self._lock:
            if key not in self._memo:
                self._memo[key] = compute()
            return self._memo[key]

    def arange(self, size: int) -> pa.Array:
        def compute() -> pa.Array:
            return pc.indices_nonzero(pa.repeat(pa.scalar(True), size)).cast(pa.int32())

        result = self.memo(("arange", size), compute)
        assert isinstance(result, pa.Array)
        return result

    def rows_mask(self, rows: pa.Array) -> pa.Array:
        """Mask of the spans whose row numbers are in ``rows``."""
        return members(rows, self.n)

    def name_is(self, name: str) -> pa.Array:
        result = self.memo(("name", name), lambda: pc.equal(self.column("name"), name))
        assert isinstance(result, pa.Array)
        return result

    def duration(self) -> pa.Array:
        def compute() -> pa.Array:
            return pc.subtract(self.column("end_ns"), self.column("start_ns"))

        result = self.memo("duration", compute)
        assert isinstance(result, pa.Array)
        return result

    # -- attributes ------------------------------------------------------------

    def prefetch(self, tenant: str, keys: Iterable[KeyUse]) -> None:
        """Extract ``keys`` plus the tenant's registered keys (see the module docstring)."""
        with self._lock:
            own = [use for use in keys if not self._has(use)]
            if not own:
                return
            uses = set(own)
            with _wanted_lock:
                for scope in ("span", "resource"):
                    uses |= {(scope, k, w) for k, w in _wanted.get((tenant, scope), ())}
            rows: dict[tuple[Scope, str], Rows] = {}
            for scope, key, within in uses:
                if scope == "resource" or within is None:
                    rows[scope, key] = None
                elif rows.get((scope, key), frozenset()) is not None:
                    rows[scope, key] = (rows.get((scope, key)) or frozenset()) | {within}
            todo = {k: r for k, r in rows.items() if not self._has_rows(k, r)}
            if any(r is None for (sc, _), r in todo.items() if sc == "span"):
                # Parsing each document dominates: with a pass over every span needed
                # anyway, the named keys ride along almost for free.
                todo = dict.fromkeys(todo)
            for part in ("span", "resource"):
                full = sorted(k for (sc, k), r in todo.items() if sc == part and r is None)
                if full:
                    self._extract("span" if part == "span" else "resource", full, None)
            named = [(k, r) for (sc, k), r in todo.items() if r is not None]
            if named:
                union = frozenset().union(*(r for _, r in named))
                self._extract("span", sorted(k for k, _ in named), union)

    def _has(self, use: KeyUse) -> bool:
        raw = self._raw.get((use[0], use[1]))
        return raw is not None and _covers(raw.rows, use[2])

    def _has_rows(self, key: tuple[Scope, str], rows: Rows) -> bool:
        raw = self._raw.get(key)
        if raw is None:
            return False
        return raw.rows is None or (rows is not None and rows <= raw.rows)

    def attribute(self, scope: Scope, key: str, within: str | None = None) -> Typed:
        """The values of attribute ``key``; with ``within``, only exact on spans named so."""
        with self._lock:
            cached = self._typed.get((scope, key))
            if cached is not None and _covers(cached[0], within):
                return cached[1]
            raw = self._raw.get((scope, key))
            if raw is None or not _covers(raw.rows, within):
                rows = None if within is None or scope == "resource" else frozenset({within})
                if rows is not None and raw is not None and raw.rows is not None:
                    rows |= raw.rows
                self._extract(scope, [key], rows)
                raw = self._raw[scope, key]
            # Decode lazily: the tenant-wide prefetch may cover keys no rule reads now.
            if scope == "resource":
                typed = self._spread_resource(decode(raw.values, with_elements=False))
            elif raw.positions is None:
                typed = decode(raw.values)
            else:
                typed = _expand(decode(raw.values), raw)
            self._typed[scope, key] = (raw.rows, typed)
            return typed

    def _spread_resource(self, distinct: Typed) -> Typed:
        """Per-distinct-document values back to one per span, part by part on demand."""
        indices = self._resource_encoding().indices

        def spread(part: Callable[[], pa.Array | None]) -> Callable[[], pa.Array | None]:
            def compute() -> pa.Array | None:
                values = part()
                return None if values is None else pc.take(values, indices)

            return compute

        return Typed.deferred(
            num=spread(lambda: distinct.num),
            text=spread(lambda: distinct.text),
            flag=spread(lambda: distinct.flag),
            present=spread(lambda: distinct.present),
            elements=lambda: None,
        )

    def _resource_encoding(self) -> pa.DictionaryArray:
        def compute() -> pa.DictionaryArray:
            return pc.dictionary_encode(self.column("resource_attributes"))

        result = self.memo("resource_encoding", compute)
        assert isinstance(result, pa.DictionaryArray)
        return result

    def _extract(self, scope: Scope, keys: list[str], rows: Rows) -> None:
        if scope == "resource":
            # Resource attributes repeat per span: parse each distinct document once.
            distinct = self._resource_encoding().dictionary
            self._raw.update({(scope, k): _Raw(None, v) for k, v in extract_raw(distinct, keys).items()})
            return
        if rows is None:
            values = extract_raw(self.column("attributes"), keys)
            self._raw.update({(scope, k): _Raw(None, v) for k, v in values.items()})
            return
        positions, span_rows = self._positions(rows)
        values = extract_raw(pc.take(self.column("attributes"), span_rows), keys)
        self._raw.update({(scope, k): _Raw(rows, v, positions, span_rows) for k, v in values.items()})

    def _positions(self, rows: frozenset[str]) -> tuple[pa.Array, pa.Array]:
        """For spans named in ``rows``: (per span: index among them or null, their span rows)."""

        def compute() -> tuple[pa.Array, pa.Array]:
            mask = pc.is_in(self.column("name"), value_set=pa.array(sorted(rows), pa.string()))
            ranks = pc.subtract(pc.cumulative_sum(pc.cast(mask, pa.int64())), 1)
            positions = pc.if_else(mask, ranks, pa.scalar(None, pa.int64()))
            return positions, pc.indices_nonzero(mask)

        result = self.memo(("positions", rows), compute)
        assert isinstance(result, tuple)
        return result

    # -- per-group aggregation -----------------------------------------------

    def group_any(self, mask: pa.Array, grouping: Grouping | None = None) -> pa.Array:
        """Per group: does any span in ``mask`` belong to it?"""
        g = grouping or self.traces
        return members(pc.filter(g.ids, mask), g.size)

    def group_count(self, mask: pa.Array, grouping: Grouping | None = None) -> pa.Array:
        """Per group: how many spans of ``mask`` belong to it (int64)."""
        g = grouping or self.traces
        counts = pc.value_counts(pc.filter(g.ids, mask))
        return self.scatter(counts.field(0), counts.field(1), g.size, 0)

    def group_reduce(
        self, values: pa.Array, mask: pa.Array, func: str, grouping: Grouping | None = None
    ) -> pa.Array:
        """Per group: ``func`` (min/max/sum/mean/first) of ``values`` over ``mask``; null if none."""
        g = grouping or self.traces
        keep = pc.and_(mask, pc.is_valid(values))
        table = pa.table({"g": pc.filter(g.ids, keep), "v": pc.filter(values, keep)})
        agg = table.group_by("g", use_threads=False).aggregate([("v", func)])
        return self.scatter(agg.column("g"), agg.column(f"v_{func}"), g.size, None)

    def scatter(
        self,
        keys: pa.Array | pa.ChunkedArray,
        values: pa.Array | pa.ChunkedArray,
        size: int,
        fill: object,
    ) -> pa.Array:
        """Dense array of ``size``: ``values[i]`` at ``keys[i]`` (distinct), ``fill`` elsewhere."""
        if isinstance(keys, pa.ChunkedArray):
            keys = keys.combine_chunks()
        if len(keys) == size and size and pc.all(pc.equal(keys, self.arange(size).cast(keys.type))).as_py():
            # Group-bys emit groups in first-seen order, which for trace codes is 0..n-1.
            dense = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
            return dense if fill is None else dense.fill_null(fill)
        positions = pc.inverse_permutation(keys.cast(pa.int64()), max_index=size - 1, output_type=pa.int64())
        dense = pc.take(values, positions)
        if isinstance(dense, pa.ChunkedArray):
            dense = dense.combine_chunks()
        return dense if fill is None else dense.fill_null(fill)

    def spread(self, per_group: pa.Array, grouping: Grouping | None = None) -> pa.Array:
        """Broadcast a per-group array back to one value per span."""
        g = grouping or self.traces
        return pc.take(per_group, g.ids)

    # -- tree structure ----------------------------------------------------------

    def parent_index(self) -> pa.Array:
        """Row of each span's parent within its trace (int32, null for roots/orphans)."""

        def compute() -> pa.Array:
            span_ids = self.column("span_id")
            parents = self.column("parent_span_id")
            found = pc.index_in(parents, value_set=span_ids)
            crossed = pc.not_equal(pc.take(self.codes, found), self.codes)
            if not pc.any(crossed).as_py():
                return found
            # A span id repeats across traces: key by "trace code/span id" instead.
            prefix = pc.binary_join_element_wise(pc.cast(self.codes, pa.string()), "", "/")
            own = pc.binary_join_element_wise(prefix, span_ids, "")
            wanted = pc.binary_join_element_wise(prefix, parents, "")
            return pc.index_in(wanted, value_set=own)

        result = self.memo("parent", compute)
        assert isinstance(result, pa.Array)
        return result

    def is_root(self) -> pa.Array:
        def compute() -> pa.Array:
            parent = self.column("parent_span_id")
            return pc.or_(pc.is_null(parent), pc.equal(parent, "")).fill_null(True)

        result = self.memo("is_root", compute)
        assert isinstance(result, pa.Array)
        return result

    def trace_value(self, name: str) -> pa.Array:
        """Trace-level intrinsics broadcast per span: duration, rootName, rootService."""

        def compute() -> pa.Array:
            if name == "duration":
                # Every span has both timestamps: one group-by for both ends of each trace.
                table = pa.table({"g": self.codes, "s": self.column("start_ns"), "e": self.column("end_ns")})
                agg = table.group_by("g", use_threads=False).aggregate([("s", "min"), ("e", "max")])
                span = pc.subtract(agg.column("e_max"), agg.column("s_min"))
                return self.spread(self.scatter(agg.column("g"), span, self.ntraces, None))
            column = self.column("name" if name == "rootName" else "service")
            return self.spread(self.group_reduce(column, self.is_root(), "first"))

        result = self.memo(("trace", name), compute)
        assert isinstance(result, pa.Array)
        return result

    def child_count(self) -> pa.Array:
        def compute() -> pa.Array:
            counts = pc.value_counts(self.parent_index().drop_null())
            return self.scatter(counts.field(0), counts.field(1), self.n, 0)

        result = self.memo("child_count", compute)
        assert isinstance(result, pa.Array)
        return result

    # -- results ---------------------------------------------------------------

    def violations(
        self,
        per_trace: pa.Array,
        evidence: pa.Array,
        message: Callable[[int], str] | str,
    ) -> list[Violation]:
        """Violations for traces flagged in ``per_trace``, citing ``evidence`` spans."""
        flagged = pc.indices_nonzero(per_trace.fill_null(False))
        if len(flagged) == 0:
            return []
        # Evidence is sparse: narrow to its rows first, then keep those of flagged traces.
        rows = pc.indices_nonzero(evidence.fill_null(False))
        row_codes = pc.take(self.codes, rows)
        keep = pc.take(per_trace, row_codes).fill_null(False)
        cited_codes = pc.filter(row_codes, keep)
        cited_ids = pc.take(self.column("span_id"), pc.filter(rows, keep))
        # Order by trace code (an int sort, stable), cut into runs per trace, then sort each
        # trace's few ids in Python: far cheaper than an Arrow sort on (code, string).
        if (
            len(cited_codes) > 1
            and not pc.all(
                pc.less_equal(cited_codes.slice(0, len(cited_codes) - 1), cited_codes.slice(1))
            ).as_py()
        ):
            order = pc.sort_indices(cited_codes)
            cited_codes, cited_ids = pc.take(cited_codes, order), pc.take(cited_ids, order)
        runs = pc.run_end_encode(cited_codes)
        ids = cited_ids.to_pylist()
        spans: dict[int, tuple[str, ...]] = {}
        start = 0
        for code, end in zip(runs.values.to_pylist(), runs.run_ends.to_pylist(), strict=True):
            spans[code] = tuple(sorted(ids[start:end]))
            start = end
        codes = flagged.to_pylist()
        trace_ids = pc.take(self.trace_ids, flagged).to_pylist()
        texts = [message] * len(codes) if isinstance(message, str) else [message(code) for code in codes]
        return [
            Violation(trace_id=trace_id, span_ids=spans.get(code, ()), message=text)
            for code, trace_id, text in zip(codes, trace_ids, texts, strict=True)
        ]
