"""Archival events in the ledger: rows moving hot -> exported -> uploaded -> verified -> archived.

Per tenant and data kind (spans, signals) there is one account per archival
stage, on the tenant's ledger (see :mod:`betrace.sinks.ledger.signals` for the
tenant registry). Each completed phase of a unit (tenant, day, kind, part) is
one transfer of ``rows`` from the previous stage's account to the next one;
removing archived data from cold storage (TTL, quota) moves it from
``archived`` to ``purged``. The credit balance of ``archived`` minus its
debits is therefore the number of rows of that kind in cold storage.

Transfer ids hash (tenant, day, kind, part, phase), so a resumed or repeated
run answers ``exists`` and never counts twice. Only the :class:`Ledger`
protocol is used, so this works on the embedded ledger and on TigerBeetle.
``user_data_64`` holds the day (days since the epoch), ``user_data_32`` the part.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from betrace.sinks.ledger.model import (
    Account,
    CreateAccountStatus,
    CreateTransferStatus,
    LedgerError,
    Transfer,
    hash128,
)
from betrace.sinks.ledger.signals import SignalLedger

#: Stage accounts in flow order; the account code is 20 + index, a transfer's code is its target's.
STAGES = ("hot", "exported", "uploaded", "verified", "archived", "purged")
PHASE_TARGET = {"export": "exported", "upload": "uploaded", "verify": "verified", "cleanup": "archived"}
PHASE_SOURCE = {"export": "hot", "upload": "exported", "verify": "uploaded", "cleanup": "verified"}
CODE_BASE = 20
KIND_CODES = {"spans": 1, "signals": 2}
_OK_ACCOUNT = {CreateAccountStatus.CREATED, CreateAccountStatus.EXISTS}
_OK_TRANSFER = {CreateTransferStatus.CREATED, CreateTransferStatus.EXISTS}


def stage_account_id(tenant: str, kind: str, stage: str) -> int:
    return hash128("betrace.archive.account", tenant, kind, stage)


def archival_transfer_id(tenant: str, day: dt.date, kind: str, part: int, phase: str) -> int:
    return hash128("betrace.archive.transfer", tenant, day.isoformat(), kind, part, phase)


@dataclass(frozen=True, slots=True)
class ArchivalEvent:
    tenant: str
    day: dt.date
    kind: str
    part: int
    #: export, upload, verify, cleanup (moves into cold), or purge (removed from cold).
    phase: str
    rows: int


class ArchivalLedger:
    """Post archival events to the ledger behind a :class:`SignalLedger` (blocking calls)."""

    def __init__(self, signals: SignalLedger) -> None:
        self.signals = signals
        self._known: set[int] = set()

    def _accounts(self, tenant: str, kind: str, ledger: int) -> None:
        wanted = [
            Account(
                id=stage_account_id(tenant, kind, stage),
                ledger=ledger,
                code=CODE_BASE + i,
                user_data_32=KIND_CODES[kind],
            )
            for i, stage in enumerate(STAGES)
        ]
        missing = [a for a in wanted if a.id not in self._known]
        if not missing:
            return
        for account, result in zip(missing, self.signals.ledger.create_accounts(missing), strict=True):
            if result.status not in _OK_ACCOUNT:
                msg = f"ledger: archive account {account.id:032x}: {result.status.name}"
                raise LedgerError(msg)
            self._known.add(account.id)

    def post(self, events: list[ArchivalEvent]) -> int:
        """Record ``events``; return how many were new (replays answer ``exists``)."""
        transfers = []
        for ev in events:
            if ev.rows <= 0:
                continue
            ledger = self.signals.ledger_for(ev.tenant)
            assert ledger is not None
            self._accounts(ev.tenant, ev.kind, ledger)
            source = "archived" if ev.phase == "purge" else PHASE_SOURCE[ev.phase]
            target = "purged" if ev.phase == "purge" else PHASE_TARGET[ev.phase]
            transfers.append(
                Transfer(
                    id=archival_transfer_id(ev.tenant, ev.day, ev.kind, ev.part, ev.phase),
                    debit_account_id=stage_account_id(ev.tenant, ev.kind, source),
                    credit_account_id=stage_account_id(ev.tenant, ev.kind, target),
                    amount=ev.rows,
                    ledger=ledger,
                    code=CODE_BASE + STAGES.index(target),
                    user_data_64=(ev.day - dt.date(1970, 1, 1)).days,
                    user_data_32=ev.part,
                )
            )
        if not transfers:
            return 0
        results = self.signals.ledger.create_transfers(transfers)
        bad = [r.status for r in results if r.status not in _OK_TRANSFER]
        if bad:
            msg = f"ledger: archival transfer rejected: {bad[0].name}"
            raise LedgerError(msg)
        return sum(1 for r in results if r.status == CreateTransferStatus.CREATED)

    def balance(self, tenant: str, kind: str, stage: str) -> int:
        """Rows currently at ``stage`` (credits minus debits of its account)."""
        found = self.signals.ledger.lookup_accounts([stage_account_id(tenant, kind, stage)])
        if not found:
            return 0
        return found[0].credits_posted - found[0].debits_posted
