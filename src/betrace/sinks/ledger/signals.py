"""Signals as ledger entries (PRD-002a): one ledger per tenant, one account per rule version.

Data model, on any :class:`~betrace.sinks.ledger.model.Ledger`:

* **Tenant → ledger number.** Ledger 1 is BeTrace's registry. A tenant gets a
  stable 32-bit ledger number >= 2, persisted *in the ledger itself*: a claim
  account ``hash("ledger-claim", n)`` whose ``user_data_128`` names the tenant,
  and a tenant account ``hash("tenant", name)`` whose ``user_data_32`` is ``n``.
  The first candidate is a hash of the name; a claim answered
  ``exists_with_different_user_data_128`` is another tenant's, so the next
  number is tried. Concurrent registrations of one tenant agree.
* **Accounts.** Per rule version an account (code 10) whose ``debits_posted``
  counts its signals (``user_data_128`` = hash of the rule id, ``user_data_32``
  = version); per tenant an "issued" account (code 11), credited by each signal.
* **Transfers.** Each signal is one immutable transfer of amount 1 on the
  tenant's ledger; ``code`` = severity (1 info .. 5 critical),
  ``user_data_128`` = trace id, ``user_data_64`` = ``source_produced_ms``,
  ``user_data_32`` = rule version. Its id is the first 128 bits of SHA-256 over
  (tenant, rule, version, trace id[, window]) — for window 0 exactly the
  ``signal_id`` — so a replay answers ``exists`` and never counts twice.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from betrace.metrics import StageHooks
from betrace.sinks.ledger.model import (
    MAX_BATCH,
    U32_MAX,
    Account,
    AccountFilter,
    AccountFilterFlags,
    CreateAccountStatus,
    Ledger,
    LedgerError,
    QueryFilter,
    Transfer,
    hash128,
)
from betrace.sinks.ledger.sink import LedgerSink

logger = logging.getLogger(__name__)

REGISTRY_LEDGER = 1
CODE_TENANT = 1
CODE_LEDGER_CLAIM = 2
CODE_RULE_VERSION = 10
CODE_ISSUED = 11
FIRST_TENANT_LEDGER = 2
SEVERITY_CODES = {"info": 1, "low": 2, "medium": 3, "high": 4, "critical": 5}
SEVERITY_NAMES = {v: k for k, v in SEVERITY_CODES.items()}

_OURS = frozenset({CreateAccountStatus.CREATED, CreateAccountStatus.EXISTS})


def tenant_account_id(tenant: str) -> int:
    return hash128("betrace.tenant", tenant)


def claim_account_id(ledger: int) -> int:
    return hash128("betrace.ledger-claim", ledger)


def rule_account_id(tenant: str, rule_id: str, version: int) -> int:
    return hash128("betrace.rule", tenant, rule_id, version)


def rule_key(rule_id: str) -> int:
    return hash128("betrace.rule-id", rule_id)


def issued_account_id(tenant: str) -> int:
    return hash128("betrace.issued", tenant)


def transfer_id(tenant: str, rule_id: str, version: int, trace_id: str, window: int = 0) -> int:
    """Deterministic signal transfer id; equals ``int(signal_id, 16)`` for window 0."""
    parts: list[str | int] = [tenant, rule_id, version, trace_id]
    if window:
        parts.append(window)
    return hash128(*parts)


@dataclass(frozen=True, slots=True)
class RuleCount:
    rule_id: str
    version: int
    signals: int


class SignalLedger:
    """Record signals as transfers (batched) and read the per-rule counters back."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        hooks: StageHooks,
        flush_items: int = 128,
        flush_interval_s: float = 0.05,
        capacity: int = MAX_BATCH,
    ) -> None:
        self.ledger = ledger
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="betrace-ledger")
        self._lock = threading.Lock()
        self._ledgers: dict[str, int] = {}
        self._accounts: set[int] = set()
        self.sink = LedgerSink(
            ledger,
            self.run,
            hooks=hooks,
            capacity=capacity,
            flush_items=flush_items,
            flush_interval_s=flush_interval_s,
            on_missing_account=self.forget_accounts,
        )

    async def run(self, fn: Any, *args: Any) -> Any:
        """Run a blocking ledger call on the ledger's own thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def forget_accounts(self) -> None:
        with self._lock:
            self._accounts.clear()

    # -- tenant registry -------------------------------------------------------------------

    def ledger_for(self, tenant: str, *, create: bool = True) -> int | None:
        """The tenant's ledger number; registers the tenant when ``create``."""
        with self._lock:
            cached = self._ledgers.get(tenant)
        if cached is not None:
            return cached
        found = self.ledger.lookup_accounts([tenant_account_id(tenant)])
        if found:
            number = found[0].user_data_32
        elif not create:
            return None
        else:
            number = self._register(tenant)
        with self._lock:
            self._ledgers[tenant] = number
        return number

    def _register(self, tenant: str) -> int:
        owner = hash128("betrace.tenant-name", tenant)
        span = U32_MAX - FIRST_TENANT_LEDGER + 1
        candidate = FIRST_TENANT_LEDGER + hash128("betrace.ledger-number", tenant) % span
        for _ in range(1024):
            claim = Account(
                id=claim_account_id(candidate),
                ledger=REGISTRY_LEDGER,
                code=CODE_LEDGER_CLAIM,
                user_data_128=owner,
                user_data_32=candidate,
            )
            (result,) = self.ledger.create_accounts([claim])
            if result.status in _OURS:
                break
            if result.status != CreateAccountStatus.EXISTS_WITH_DIFFERENT_USER_DATA_128:
                msg = f"ledger: cannot claim ledger {candidate} for tenant {tenant!r}: {result.status.name}"
                raise LedgerError(msg)
            candidate = FIRST_TENANT_LEDGER + (candidate - FIRST_TENANT_LEDGER + 1) % span
        else:  # pragma: no cover - needs 1024 consecutive collisions
            msg = f"ledger: no free ledger number for tenant {tenant!r}"
            raise LedgerError(msg)
        entry = Account(
            id=tenant_account_id(tenant),
            ledger=REGISTRY_LEDGER,
            code=CODE_TENANT,
            user_data_128=owner,
            user_data_32=candidate,
        )
        (result,) = self.ledger.create_accounts([entry])
        if result.status in _OURS:
            logger.info("ledger: tenant %r uses ledger %d", tenant, candidate)
            return candidate
        # A concurrent registrar picked another number first; theirs is the tenant's.
        (existing,) = self.ledger.lookup_accounts([entry.id])
        return existing.user_data_32

    # -- recording ----------------------------------------------------------------------------

    def prepare(self, docs: Iterable[dict[str, Any]]) -> list[Transfer]:
        """Blocking: make sure every ledger and account exists; return one transfer per signal."""
        transfers: list[Transfer] = []
        missing: dict[int, Account] = {}
        with self._lock:
            known = self._accounts.copy()
        for doc in docs:
            tenant, rule_id, version = doc["tenant"], doc["rule_id"], int(doc["rule_version"])
            ledger = self.ledger_for(tenant)
            assert ledger is not None
            debit, credit = rule_account_id(tenant, rule_id, version), issued_account_id(tenant)
            if debit not in known:
                missing[debit] = Account(
                    id=debit,
                    ledger=ledger,
                    code=CODE_RULE_VERSION,
                    user_data_128=rule_key(rule_id),
                    user_data_32=version,
                )
            if credit not in known:
                missing[credit] = Account(id=credit, ledger=ledger, code=CODE_ISSUED)
            transfers.append(
                Transfer(
                    id=transfer_id(tenant, rule_id, version, doc["trace_id"], int(doc.get("window", 0))),
                    debit_account_id=debit,
                    credit_account_id=credit,
                    amount=1,
                    ledger=ledger,
                    code=SEVERITY_CODES.get(str(doc.get("severity")), SEVERITY_CODES["info"]),
                    user_data_128=int(doc["trace_id"], 16),
                    user_data_64=max(0, int(doc.get("source_produced_ms", 0))),
                    user_data_32=version,
                )
            )
        if missing:
            accounts = list(missing.values())
            results = self.ledger.create_accounts(accounts)
            bad = [(a, r.status) for a, r in zip(accounts, results, strict=True) if r.status not in _OURS]
            if bad:
                account, status = bad[0]
                msg = f"ledger: account {account.id:032x} (ledger {account.ledger}): {status.name}"
                raise LedgerError(msg)
            with self._lock:
                self._accounts.update(missing)
        return transfers

    async def record(self, docs: list[dict[str, Any]]) -> tuple[int, int]:
        """Record ``docs`` as transfers; return (newly counted, already recorded)."""
        before = self.sink.created, self.sink.duplicates
        for transfer in await self.run(self.prepare, docs):
            await self.sink.put(transfer)
        await self.sink.flush()
        return self.sink.created - before[0], self.sink.duplicates - before[1]

    # -- reading ----------------------------------------------------------------------------

    def counts(self, tenant: str, rule_id: str) -> list[RuleCount]:
        """Blocking: signals per version of ``rule_id`` in ``tenant``, from the account balances."""
        ledger = self.ledger_for(tenant, create=False)
        if ledger is None:
            return []
        accounts = self.ledger.query_accounts(
            QueryFilter(
                limit=MAX_BATCH, ledger=ledger, code=CODE_RULE_VERSION, user_data_128=rule_key(rule_id)
            )
        )
        return sorted(
            (RuleCount(rule_id, a.user_data_32, a.debits_posted) for a in accounts),
            key=lambda c: c.version,
        )

    def signal_transfers(
        self,
        tenant: str,
        rule_id: str,
        version: int,
        *,
        timestamp_min: int = 0,
        timestamp_max: int = 0,
        limit: int = MAX_BATCH,
    ) -> list[Transfer]:
        """Blocking: the signal transfers of one rule version in a ledger-timestamp range."""
        if self.ledger_for(tenant, create=False) is None:
            return []
        return self.ledger.get_account_transfers(
            AccountFilter(
                account_id=rule_account_id(tenant, rule_id, version),
                limit=limit,
                flags=AccountFilterFlags.DEBITS,
                timestamp_min=timestamp_min,
                timestamp_max=timestamp_max,
            )
        )

    async def close(self) -> None:
        """Write what is buffered, then release the ledger."""
        try:
            await self.sink.flush()
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        """Release the ledger without flushing (readers, or after a failed flush)."""
        self._executor.shutdown(wait=True)
        self.ledger.close()
