"""The audit trail: append-only events with causal parents (issue 9)."""

from betrace.audit.events import AuditEventType, AuditRecorder, EventRef, NullAuditRecorder

__all__ = ["AuditEventType", "AuditRecorder", "EventRef", "NullAuditRecorder"]
