"""The signal ledger (PRD-002a): TigerBeetle's data model, on TigerBeetle or embedded in DuckDB.

``open_ledger`` picks the backend: a TigerBeetle cluster when addresses are
configured (``BETRACE_TIGERBEETLE_ADDRESSES``), otherwise an embedded ledger
per tenant in ``<data_dir>/ledger/tenant=<t>.duckdb`` (ledger = tenant; one
writer per file, like the tenant stores: see :mod:`betrace.sinks.ledger.tenants`).
``<data_dir>/ledger.duckdb`` is the single-file layout of earlier versions,
still opened when no tenant is given.
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
from betrace.sinks.ledger.tenants import TenantLedgers, tenant_ledger_path

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
    "TenantLedgers",
    "Transfer",
    "TransferFlags",
    "open_ledger",
    "tenant_ledger_path",
    "transfer_id",
]


def open_ledger(
    data_dir: Path,
    addresses: str | None = None,
    *,
    cluster_id: int = 0,
    read_only: bool = False,
    tenant: str | None = None,
) -> Ledger:
    """TigerBeetle at ``addresses`` if given, else the embedded ledger of ``tenant`` in ``data_dir``."""
    if addresses:
        from betrace.sinks.ledger.tb_client import open_tigerbeetle  # noqa: PLC0415 - native client, lazily

        return open_tigerbeetle(addresses, cluster_id=cluster_id)
    if tenant is not None:
        return EmbeddedLedger(tenant_ledger_path(data_dir, tenant), read_only=read_only)
    return EmbeddedLedger(data_dir / EMBEDDED_FILE, read_only=read_only)
