"""Exactly-once checks after a run: stored spans, stored signals, ledger transfers.

Every check reads the given data directories at once through read-only
``ATTACH``es and counts rows *and* distinct keys across them, so a span stored
twice, in one file or in two, counts as a duplicate. The harness runs every
worker on one shared data directory, as a deployment does (each tenant file
has exactly one owning worker at a time).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import duckdb


@dataclass
class StoreCheck:
    span_rows: int
    distinct_spans: int
    signal_rows: int
    distinct_signals: int
    signals_not_emitted: int
    ledger_transfers: int
    tenant_files: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _union(aliases: list[str], select: str, table: str) -> str:
    parts = [f"SELECT {select} FROM {a}.{table}" for a in aliases]
    return " UNION ALL ".join(parts) or f"SELECT {select} WHERE false"


def check_stores(data_dirs: list[Path]) -> StoreCheck:
    con = duckdb.connect()
    try:
        tenant_aliases: list[str] = []
        ledger_aliases: list[str] = []
        for d, data_dir in enumerate(data_dirs):
            for f, path in enumerate(sorted(data_dir.glob("tenant=*.duckdb"))):
                alias = f"t{d}_{f}"
                con.execute(f"ATTACH '{path}' AS {alias} (READ_ONLY)")
                tenant_aliases.append(alias)
            # One embedded ledger per tenant (ledger/tenant=<t>.duckdb); older layouts had one file.
            ledgers = sorted(data_dir.glob("ledger/tenant=*.duckdb")) + sorted(data_dir.glob("ledger.duckdb"))
            for f, ledger in enumerate(ledgers):
                alias = f"l{d}_{f}"
                con.execute(f"ATTACH '{ledger}' AS {alias} (READ_ONLY)")
                ledger_aliases.append(alias)
        spans = _union(tenant_aliases, "tenant, trace_id, span_id", "spans")
        row = con.execute(
            f"SELECT count(*), count(DISTINCT (tenant, trace_id, span_id)) FROM ({spans})"
        ).fetchone()
        span_rows, distinct_spans = (int(row[0]), int(row[1])) if row else (0, 0)
        signals = _union(tenant_aliases, "signal_id, emitted", "signals")
        row = con.execute(
            "SELECT count(*), count(DISTINCT signal_id), count(*) FILTER (WHERE NOT emitted) "
            f"FROM ({signals})"
        ).fetchone()
        sig_rows, sig_distinct, not_emitted = (
            (int(row[0]), int(row[1]), int(row[2] or 0)) if row else (0, 0, 0)
        )
        transfers = _union(ledger_aliases, "id", "transfers")
        row = con.execute(f"SELECT count(DISTINCT id) FROM ({transfers})").fetchone()
        ledger = int(row[0]) if row else 0
    finally:
        con.close()
    return StoreCheck(
        span_rows, distinct_spans, sig_rows, sig_distinct, not_emitted, ledger, len(tenant_aliases)
    )
