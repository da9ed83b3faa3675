"""The contract every subsystem records audit events through.

Subsystems depend only on :class:`AuditRecorder`; the DuckDB-backed store
(:mod:`betrace.audit.recorder`, built by :func:`betrace.audit.store.recorder_for`)
implements it, and :class:`NullAuditRecorder` stands in where no trail is kept
(unit tests, one-off CLI runs without a data directory).

``record`` never blocks on I/O: it hands back the event's :class:`EventRef`
at once (pass it as ``parent`` to a later event) and the store writes events
in batches, parents before children.

Deterministic events: pass ``event_id=`` (see :func:`derived_event_id`) and
``at=`` for an event that may be recorded more than once for one fact — a
signal re-published after a replay, a rule version seen by every worker. The
store keeps the first and ignores the rest, because event ids are unique.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

#: Field of a candidate signal document that carries its ``evaluation.batch`` event
#: (``EventRef.to_dict()``) from the evaluate stage to the signal sink; never published.
AUDIT_PARENT_FIELD = "audit_parent"

#: Event ids: 1-64 of these characters (uuid4 hex or a derived digest).
EVENT_ID_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")


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


def derived_event_id(kind: str, *parts: str) -> str:
    """A stable event id for one fact: the same ``kind`` and ``parts`` give the same id."""
    key = "\x1f".join((kind, *parts)).encode()
    return hashlib.sha256(key).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class EventRef:
    """Identifies one audit event; pass it as ``parent`` to record a child."""

    event_id: str
    event_date: dt.date

    @staticmethod
    def new(at: dt.datetime | None = None) -> EventRef:
        when = at or dt.datetime.now(dt.UTC)
        return EventRef(uuid.uuid4().hex, when.astimezone(dt.UTC).date())

    def to_dict(self) -> dict[str, str]:
        """A JSON-safe form, e.g. to carry a parent inside a Kafka message."""
        return {"event_id": self.event_id, "event_date": self.event_date.isoformat()}

    @staticmethod
    def from_dict(doc: object) -> EventRef | None:
        """The inverse of :meth:`to_dict`; None for anything that is not a valid reference."""
        if not isinstance(doc, dict):
            return None
        event_id, event_date = doc.get("event_id"), doc.get("event_date")
        if (
            not isinstance(event_id, str)
            or not EVENT_ID_RE.match(event_id)
            or not isinstance(event_date, str)
        ):
            return None
        try:
            return EventRef(event_id, dt.date.fromisoformat(event_date))
        except ValueError:
            return None


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
        event_id: str | None = None,
        at: dt.datetime | None = None,
    ) -> EventRef:
        """Append one event; never updates or deletes. Returns its reference.

        ``event_id`` (optional) makes the event idempotent: a second record
        with the same id is ignored. ``at`` (optional) is when the fact
        happened; it fixes ``event_date`` (default: now).
        """
        ...


class ClosableAuditRecorder(AuditRecorder, Protocol):
    """What owners of a recorder (worker, CLI commands) see: they flush and close it."""

    def flush(self) -> int:
        """Write what is buffered now; return how many events were written."""
        ...

    def close(self) -> None:
        """Flush and stop; later records are written synchronously by a final flush only."""
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
        event_id: str | None = None,
        at: dt.datetime | None = None,
    ) -> EventRef:
        del event_type, actor, subject, outcome, tenant, payload, parent
        when = at or dt.datetime.now(dt.UTC)
        if event_id is not None:
            return EventRef(event_id, when.astimezone(dt.UTC).date())
        return EventRef.new(when)

    def flush(self) -> int:
        return 0

    def close(self) -> None:
        return None
