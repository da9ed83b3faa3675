"""The audit trail: append-only events with causal parents (issue 9, docs/audit.md).

Record through :class:`AuditRecorder` (``betrace.audit.events``); build the
process's recorder with ``betrace.audit.store.recorder_for(settings)``; read
with ``betrace.audit.store.AuditStore``.
"""

from betrace.audit.events import (
    AUDIT_PARENT_FIELD,
    AuditEventType,
    AuditRecorder,
    ClosableAuditRecorder,
    EventRef,
    NullAuditRecorder,
    derived_event_id,
)

__all__ = [
    "AUDIT_PARENT_FIELD",
    "AuditEventType",
    "AuditRecorder",
    "ClosableAuditRecorder",
    "EventRef",
    "NullAuditRecorder",
    "derived_event_id",
]
