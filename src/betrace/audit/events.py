"""The contract every subsystem records audit events through.

Subsystems depend only on :class:`AuditRecorder`; the DuckDB-backed store
implements it, and :class:`NullAuditRecorder` stands in where no trail is kept
(unit tests, one-off CLI runs without a data directory).
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol


class AuditEventType(StrEnum):
    INGESTION_RUN_STARTED = "ingestion_run.started"
    INGESTION_RUN_FINISHED = "ingestion_run.finished"
    INGESTION_BATCH = "ingestion_run.batch"
    RULE_CREATED = "rule.created"
    RULE_CHANGED = "rule.changed"
    RULE_DISABLED = "rule.disabled"
    RULE_ENABLED = "rule.enabled"
    RULE_QUARANTINED = "rule.quarantined"
    EVALUATION_BATCH = "evaluation.batch"
    SIGNAL_EMITTED = "signal.emitted"
    ARCHIVAL_RUN = "archival.run"
    ARCHIVAL_PHASE = "archival.phase"
    BREAKER_STATE_CHANGED = "breaker.state_changed"
    WORKER_STARTED = "worker.started"
    WORKER_STOPPED = "worker.stopped"


@dataclass(frozen=True, slots=True)
class EventRef:
    """Identifies one audit event; pass it as ``parent`` to record a child."""

    event_id: str
    event_date: dt.date

    @staticmethod
    def new(at: dt.datetime | None = None) -> EventRef:
        when = at or dt.datetime.now(dt.UTC)
        return EventRef(uuid.uuid4().hex, when.date())


class AuditRecorder(Protocol):
    def record(
        self,
        event_type: AuditEventType,
        *,
        actor: str,
        subject: str,
        outcome: str = "ok",
        tenant: str | None = None,
        payload: dict[str, Any] | None = None,
        parent: EventRef | None = None,
    ) -> EventRef:
        """Append one event; never updates or deletes. Returns its reference."""
        ...


class NullAuditRecorder:
    """Keeps no trail but hands out references, so callers need no special case."""

    def record(
        self,
        event_type: AuditEventType,
        *,
        actor: str,
        subject: str,
        outcome: str = "ok",
        tenant: str | None = None,
        payload: dict[str, Any] | None = None,
        parent: EventRef | None = None,
    ) -> EventRef:
        del event_type, actor, subject, outcome, tenant, payload, parent
        return EventRef.new()
