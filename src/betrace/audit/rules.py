"""Audit events for rule versions, recorded by every worker's rule watcher.

Why the watcher and not the ``betrace rules`` CLI: the watcher sees every
version that reaches the rules topic, whoever wrote it (the CLI, the YAML
seed of a worker, a future API or a script producing records), and it sees
it after the topic's conflict resolution, so only versions that won are
recorded. Every worker sees every version, and sees them all again after a
restart or reconnect; each event's id is therefore derived from the record
key (tenant, rule, version, digest) and dated by the version's ``created_at``,
so the trail keeps exactly one event per version however often it is seen.

The parent of a version's event is the event of the version before it, so
the chain of a rule's latest event is its whole history.
"""

from __future__ import annotations

import datetime as dt

from betrace.audit.events import AuditEventType, AuditRecorder, EventRef, derived_event_id
from betrace.rules.registry import RegistryState, RuleVersion


def rule_event_ref(version: RuleVersion, record_digest: str) -> EventRef:
    rule = version.rule
    event_id = derived_event_id("rule", rule.tenant, rule.id, str(rule.version), record_digest)
    return EventRef(event_id, version.created_at.astimezone(dt.UTC).date())


def _event_type(version: RuleVersion, previous: RuleVersion | None) -> AuditEventType:
    if previous is None:
        return AuditEventType.RULE_CREATED
    if previous.rule.enabled and not version.rule.enabled:
        return AuditEventType.RULE_DISABLED
    if not previous.rule.enabled and version.rule.enabled:
        return AuditEventType.RULE_ENABLED
    return AuditEventType.RULE_CHANGED


class RuleAuditor:
    """Records each rule version once per process (and once per trail, by its derived id)."""

    def __init__(self, audit: AuditRecorder) -> None:
        self.audit = audit
        self._seen: set[tuple[str, str, int]] = set()

    def observe(self, state: RegistryState) -> int:
        """Record the versions of ``state`` not recorded yet, oldest first; return how many."""
        recorded = 0
        for tenant, rule_id in state.rule_keys():
            previous: RuleVersion | None = None
            parent: EventRef | None = None
            for version in state.history(tenant, rule_id):
                number = version.rule.version
                record_digest = state.digest_of(tenant, rule_id, number) or ""
                ref = rule_event_ref(version, record_digest)
                if (tenant, rule_id, number) not in self._seen:
                    self._seen.add((tenant, rule_id, number))
                    self._record(version, previous, parent, ref, record_digest)
                    recorded += 1
                previous, parent = version, ref
        return recorded

    def _record(
        self,
        version: RuleVersion,
        previous: RuleVersion | None,
        parent: EventRef | None,
        ref: EventRef,
        record_digest: str,
    ) -> None:
        rule = version.rule
        self.audit.record(
            _event_type(version, previous),
            actor=version.author,
            subject=f"rule {rule.tenant}/{rule.id} v{rule.version}",
            tenant=rule.tenant,
            payload={
                "rule_id": rule.id,
                "version": rule.version,
                "digest": record_digest,
                "name": rule.name,
                "severity": rule.severity,
                "language": rule.language,
                "enabled": rule.enabled,
                "expression": rule.expression,
                "reason": version.reason,
                "created_at": version.created_at.astimezone(dt.UTC).isoformat(timespec="milliseconds"),
            },
            parent=parent,
            event_id=ref.event_id,
            at=version.created_at,
        )
