"""The signal ledger (PRD-002a): TigerBeetle's data model, on TigerBeetle or embedded in DuckDB.

``open_ledger`` picks the backend: a TigerBeetle cluster when addresses are
configured (``BETRACE_TIGERBEETLE_ADDRESSES``), otherwise the embedded ledger
in ``<data_dir>/ledger.duckdb``.
"""

from __future__ import annotations

from pathlib import Path

from betrace.sinks.ledger.embedded import EmbeddedLedger
from betrace.sinks.ledger.model import (
    MAX_BATCH,
    Account,
    AccountFilter,
    AccountFilterFlags,
    AccountFlags,
    CreateAccountResult,
    CreateAccountStatus,
    CreateTransferResult,
    CreateTransferStatus,
    Ledger,
    LedgerError,
    LedgerLockedError,
    LedgerRequestError,
    QueryFilter,
    QueryFilterFlags,
    Transfer,
    TransferFlags,
)
from betrace.sinks.ledger.signals import RuleCount, SignalLedger, transfer_id
from betrace.sinks.ledger.sink import LedgerSink

EMBEDDED_FILE = "ledger.duckdb"

__all__ = [
    "EMBEDDED_FILE",
    "MAX_BATCH",
    "Account",
    "AccountFilter",
    "AccountFilterFlags",
    "AccountFlags",
    "CreateAccountResult",
    "CreateAccountStatus",
    "CreateTransferResult",
    "CreateTransferStatus",
    "EmbeddedLedger",
    "Ledger",
    "LedgerError",
    "LedgerLockedError",
    "LedgerRequestError",
    "LedgerSink",
    "QueryFilter",
    "QueryFilterFlags",
    "RuleCount",
    "SignalLedger",
    "Transfer",
    "TransferFlags",
    "open_ledger",
    "transfer_id",
]


def open_ledger(
    data_dir: Path, addresses: str | None = None, *, cluster_id: int = 0, read_only: bool = False
) -> Ledger:
    """TigerBeetle at ``addresses`` if given, else the embedded ledger in ``data_dir``."""
    if addresses:
        from betrace.sinks.ledger.tb_client import open_tigerbeetle  # noqa: PLC0415 - native client, lazily

        return open_tigerbeetle(addresses, cluster_id=cluster_id)
    return EmbeddedLedger(data_dir / EMBEDDED_FILE, read_only=read_only)
