"""Archival events on both ledger backends: deterministic ids, replays never count twice."""

from __future__ import annotations

import datetime as dt
import uuid

from betrace.metrics import InMemoryHooks
from betrace.sinks.ledger import Ledger, SignalLedger
from betrace.sinks.ledger.archival import ArchivalEvent, ArchivalLedger, archival_transfer_id


def test_phases_move_rows_and_replays_answer_exists(ledger: Ledger) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    archival = ArchivalLedger(SignalLedger(ledger, hooks=InMemoryHooks()))
    day = dt.date(2026, 11, 20)
    events = [
        ArchivalEvent(tenant, day, "spans", 0, p, 1000) for p in ("export", "upload", "verify", "cleanup")
    ]
    assert archival.post(events) == 4
    assert archival.post(events) == 0  # a resumed run replays every phase
    assert archival.post([ArchivalEvent(tenant, day, "spans", 1, "export", 7)]) == 1
    assert archival.balance(tenant, "spans", "archived") == 1000
    assert archival.balance(tenant, "spans", "exported") == 7
    assert archival.balance(tenant, "spans", "hot") == -1007
    assert archival.post([ArchivalEvent(tenant, day, "spans", 0, "purge", 1000)]) == 1
    assert archival.balance(tenant, "spans", "archived") == 0
    assert archival.balance(tenant, "spans", "purged") == 1000
    assert archival.balance(tenant, "signals", "archived") == 0
    (transfer,) = ledger.lookup_transfers([archival_transfer_id(tenant, day, "spans", 0, "cleanup")])
    assert transfer.amount == 1000 and transfer.user_data_32 == 0
    assert transfer.user_data_64 == (day - dt.date(1970, 1, 1)).days
