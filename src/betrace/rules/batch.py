"""Per-batch derived columns shared by every rule evaluated on the same table.

Evaluating 20 rules on one batch should parse the attribute JSON once, encode
trace ids once and resolve parent links once. :func:`context_for` therefore
keeps the :class:`BatchContext` of the last few tables (by identity), and
compiled rules register the attribute keys they read (:func:`register_keys`)
so that the first rule to touch the attributes extracts the keys of all the
tenant's rules in a single DuckDB pass.
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
from betrace.rules.typed import Typed, decode, extract_raw

Scope = Literal["span", "resource"]
#: OTLP SpanKind and StatusCode enum names, indexed by their numeric values.
KIND_NAMES = ("unspecified", "internal", "server", "client", "producer", "consumer")
STATUS_NAMES = ("unset", "ok", "error")
#: Upper bound on parent-chain walks, so that a cyclic parent link in bad
#: data cannot loop forever.
MAX_TREE_DEPTH = 1024
_CACHE_SIZE = 4

_wanted: dict[tuple[str, Scope], Counter[str]] = defaultdict(Counter)
_wanted_lock = threading.Lock()
_cache: list[BatchContext] = []
_cache_lock = threading.Lock()


def register_keys(tenant: str, keys: Iterable[tuple[Scope, str]]) -> Callable[[], None]:
    """Record that a live compiled rule of ``tenant`` reads ``keys``; return the undo."""
    keys = list(keys)
    with _wanted_lock:
        for scope, key in keys:
            _wanted[tenant, scope][key] += 1

    def unregister() -> None:
        with _wanted_lock:
            for scope, key in keys:
                counter = _wanted[tenant, scope]
                counter[key] -= 1
                if counter[key] <= 0:
                    del counter[key]

    return unregister


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
        self._raw: dict[tuple[Scope, str], pa.Array] = {}
        self._typed: dict[tuple[Scope, str], Typed] = {}
        self._lock = threading.RLock()
        self.all_false: pa.Array = pa.repeat(pa.scalar(False), self.n)
        self.all_true: pa.Array = pa.repeat(pa.scalar(True), self.n)

    # -- columns -------------------------------------------------------------

    def column(self, name: str) -> pa.Array:
        col = self._columns.get(name)
        if col is None:
            col = self.table.column(name).combine_chunks()
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

    def prefetch(self, tenant: str, keys: Iterable[tuple[Scope, str]]) -> None:
        """Extract ``keys`` (plus the tenant's registered keys) in one pass per scope."""
        needed: dict[Scope, set[str]] = defaultdict(set)
        for scope, key in keys:
            needed[scope].add(key)
        with self._lock:
            for scope, wanted in needed.items():
                missing = {k for k in wanted if (scope, k) not in self._raw}
                if not missing:
                    continue
                with _wanted_lock:
                    missing |= set(_wanted.get((tenant, scope), ()))
                missing = {k for k in missing if (scope, k) not in self._raw}
                self._extract(scope, sorted(missing))

    def attribute(self, scope: Scope, key: str) -> Typed:
        with self._lock:
            typed = self._typed.get((scope, key))
            if typed is not None:
                return typed
            if (scope, key) not in self._raw:
                self._extract(scope, [key])
            # Decode lazily: the tenant-wide prefetch may cover keys no rule reads now.
            raw = self._raw[scope, key]
            if scope == "span":
                typed = decode(raw)
            else:
                encoded = self._resource_encoding()
                distinct = decode(raw, with_elements=False)
                typed = Typed(
                    num=pc.take(distinct.num, encoded.indices),
                    text=pc.take(distinct.text, encoded.indices),
                    flag=pc.take(distinct.flag, encoded.indices),
                    present=pc.take(distinct.present, encoded.indices),
                )
            self._typed[scope, key] = typed
            return typed

    def _resource_encoding(self) -> pa.DictionaryArray:
        def compute() -> pa.DictionaryArray:
            return pc.dictionary_encode(self.column("resource_attributes"))

        result = self.memo("resource_encoding", compute)
        assert isinstance(result, pa.DictionaryArray)
        return result

    def _extract(self, scope: Scope, keys: list[str]) -> None:
        if scope == "span":
            self._raw.update({(scope, k): v for k, v in extract_raw(self.column("attributes"), keys).items()})
            return
        # Resource attributes repeat per span: parse each distinct document once.
        distinct = self._resource_encoding().dictionary
        self._raw.update({(scope, k): v for k, v in extract_raw(distinct, keys).items()})

    # -- per-group aggregation -----------------------------------------------

    def group_any(self, mask: pa.Array, grouping: Grouping | None = None) -> pa.Array:
        """Per group: does any span in ``mask`` belong to it?"""
        g = grouping or self.traces
        return pc.is_in(self.arange(g.size), value_set=pc.filter(g.ids, mask))

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
        """Dense array of ``size``: ``values[i]`` at ``keys[i]``, ``fill`` elsewhere."""
        positions = pc.index_in(self.arange(size), value_set=keys)
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
                start = self.group_reduce(self.column("start_ns"), self.all_true, "min")
                end = self.group_reduce(self.column("end_ns"), self.all_true, "max")
                return self.spread(pc.subtract(end, start))
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
        keep = pc.and_(evidence, self.spread(per_trace)).fill_null(False)
        cited = pa.table({"c": pc.filter(self.codes, keep), "s": pc.filter(self.column("span_id"), keep)})
        cited = cited.take(pc.sort_indices(cited, [("c", "ascending"), ("s", "ascending")]))
        spans: dict[int, list[str]] = {}
        for code, span_id in zip(cited.column("c").to_pylist(), cited.column("s").to_pylist(), strict=True):
            spans.setdefault(code, []).append(span_id)
        trace_ids = pc.take(self.trace_ids, flagged).to_pylist()
        if isinstance(message, str):
            return [
                Violation(trace_id=trace_id, span_ids=tuple(spans.get(code, ())), message=message)
                for code, trace_id in zip(flagged.to_pylist(), trace_ids, strict=True)
            ]
        return [
            Violation(trace_id=trace_id, span_ids=tuple(spans.get(code, ())), message=message(code))
            for code, trace_id in zip(flagged.to_pylist(), trace_ids, strict=True)
        ]
