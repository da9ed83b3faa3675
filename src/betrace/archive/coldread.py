"""Reading archived days back: hot and cold tables behind the same names, per query.

For a tenant connection, :meth:`ColdCatalog.attach` makes the tenant's
*cleaned* archived files (listed in ``archive_days``, which the manifests
mirror) readable — through DuckDB's own ``read_parquet`` for a local
directory, through a registered ``pyarrow.dataset`` over the cold storage's
filesystem for S3 — and returns a ``WITH`` prefix that shadows ``spans``,
``trace_summaries``, ``traces`` and ``signals`` with ``hot UNION ALL cold``.
Queries keep their SQL; DuckDB pushes filters (a trace id, a time range) into
the Parquet scan, and because files are sorted by trace id, row-group
statistics skip almost everything.

Only units in state ``cleaned`` are read: their rows are gone from the hot
store in the same transaction that set the state, so no row is counted twice
and none is missed, whether a day is hot, archived or half-way.
DuckDB's ``httpfs`` extension is not needed: the dataset reads through the
cold storage's own pyarrow filesystem (local or S3).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds

from betrace.archive import state
from betrace.sinks.cold.base import ColdStorage
from betrace.sinks.store_schema import TRACES_VIEW_SQL

SPAN_COLS = (
    "tenant, trace_id, span_id, parent_span_id, name, service, kind, status_code, start_ns, end_ns, "
    "attributes, resource_attributes, produced_ms"
)
SUMMARY_COLS = (
    "trace_id, tenant, start_ns, end_ns, span_count, error_count, root_name, root_service, services, "
    "ingested_ns"
)
#: Parquet keeps DuckDB's JSON columns as strings; cast back so both branches have one type.
COLD_SPAN_COLS = SPAN_COLS.replace(
    "attributes, resource_attributes",
    "attributes::JSON AS attributes, resource_attributes::JSON AS resource_attributes",
)
SIGNAL_COLS = (
    "signal_id, tenant, rule_id, rule_version, rule_name, trace_id, span_ids, severity, message, "
    "detected_at, source_produced_ms"
)
TRACES_VIEW = TRACES_VIEW_SQL


@dataclass(frozen=True, slots=True)
class Tables:
    """A ``WITH`` prefix for query SQL; empty means the hot tables alone."""

    prefix: str = ""


HOT = Tables()


class ColdCatalog:
    """Datasets over archived files, cached per file list (files never change once cleaned)."""

    def __init__(self, cold: ColdStorage) -> None:
        self.cold = cold
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, ...], ds.Dataset] = {}

    def _dataset(self, keys: tuple[str, ...]) -> ds.Dataset:
        with self._lock:
            found = self._cache.get(keys)
        if found is not None:
            return found
        fs, base = self.cold.arrow_filesystem()
        dataset = ds.dataset([f"{base}/{k}" for k in keys], filesystem=fs, format="parquet")
        with self._lock:
            if len(self._cache) > 256:
                self._cache.clear()
            self._cache[keys] = dataset
        return dataset

    def files(self, con: duckdb.DuckDBPyConnection) -> dict[str, tuple[str, ...]]:
        """Cleaned archived files of this tenant by file kind (spans, traces, signals)."""
        out: dict[str, list[str]] = {"spans": [], "traces": [], "signals": []}
        for unit in state.units(con, "state = 'cleaned'"):
            for key in unit.keys:
                out[key.rpartition("/")[2].partition("-")[0]].append(key)
        return {k: tuple(v) for k, v in out.items() if v}

    def _source(self, con: duckdb.DuckDBPyConnection, name: str, keys: tuple[str, ...]) -> str:
        """A FROM item over ``keys``: DuckDB's own Parquet reader on a local directory (its
        metadata cache makes lookups cheaper), a registered pyarrow dataset elsewhere (S3)."""
        if self.cold.backend == "filesystem":
            _, base = self.cold.arrow_filesystem()
            paths = ", ".join("'" + f"{base}/{k}".replace("'", "''") + "'" for k in keys)
            return f"read_parquet([{paths}])"
        con.register(name, self._dataset(keys))
        return name

    def attach(self, con: duckdb.DuckDBPyConnection) -> Tables:
        """Register this tenant's cold datasets on ``con`` (a cursor) and return the SQL prefix."""
        files = self.files(con)
        if not files:
            return HOT
        # Only fixed column lists and registered names are interpolated below.
        ctes: list[str] = []
        if "spans" in files:
            src = self._source(con, "_cold_spans", files["spans"])
            ctes.append(
                f"spans AS NOT MATERIALIZED (SELECT {SPAN_COLS} FROM main.spans UNION ALL "  # noqa: S608
                f"SELECT {COLD_SPAN_COLS} FROM {src})"
            )
        if "traces" in files:
            src = self._source(con, "_cold_traces", files["traces"])
            ctes.append(
                f"trace_summaries AS NOT MATERIALIZED (SELECT {SUMMARY_COLS} FROM main.trace_summaries "  # noqa: S608
                f"UNION ALL SELECT {SUMMARY_COLS} FROM {src})"
            )
            ctes.append(f"traces AS NOT MATERIALIZED ({TRACES_VIEW})")
        if "signals" in files:
            src = self._source(con, "_cold_signals", files["signals"])
            ctes.append(
                f"signals AS NOT MATERIALIZED (SELECT {SIGNAL_COLS}, emitted, recorded_ns FROM main.signals "  # noqa: S608
                f"UNION ALL SELECT {SIGNAL_COLS}, TRUE AS emitted, recorded_ns FROM {src})"
            )
        return Tables("WITH " + ",\n".join(ctes) + "\n")


def cold_table(catalog: ColdCatalog, con: duckdb.DuckDBPyConnection, kind: str) -> pa.Table | None:
    """Every archived row of one file kind (tests and stats)."""
    files = catalog.files(con).get(kind)
    return catalog._dataset(files).to_table() if files else None
