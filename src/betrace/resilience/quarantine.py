"""Rule quarantine: a rule whose evaluation keeps failing stops being evaluated.

Each rule *version* is tracked on its own: ``failures`` evaluation errors
within ``window_seconds`` quarantine ``(tenant, rule id, version)`` with the
last error as the reason. The other rules keep running. A new version of the
rule (published through the registry, picked up by hot reload) has a new key
and so is evaluated again: the quarantine is lifted by fixing the rule.

Every quarantine records a ``rule.quarantined`` audit event, bumps
``betrace_rule_quarantines_total`` and the ``betrace_rules_quarantined`` gauge,
and is written to ``<data_dir>/quarantine.json`` (atomically) so that
``betrace rules list`` shows it next to the rule.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from betrace.audit.events import AuditEventType, AuditRecorder, NullAuditRecorder

if TYPE_CHECKING:
    from betrace.config import Settings
    from betrace.metrics import StageHooks
    from betrace.rules.model import Rule

logger = logging.getLogger(__name__)

QUARANTINE_FILE = "quarantine.json"

Key = tuple[str, str, int]


@dataclass(frozen=True, slots=True)
class QuarantinedRule:
    tenant: str
    rule_id: str
    version: int
    reason: str
    failures: int
    since: str


def key_of(rule: Rule) -> Key:
    return (rule.tenant, rule.id, rule.version)


def read_quarantine(path: Path) -> list[QuarantinedRule]:
    """What a worker wrote to ``path``; empty if there is no file or it is unreadable."""
    try:
        docs = json.loads(path.read_text())
        return [QuarantinedRule(**d) for d in docs]
    except (OSError, ValueError, TypeError):
        return []


class RuleQuarantine:
    """Counts evaluation failures per rule version and quarantines repeat offenders."""

    def __init__(
        self,
        *,
        failures: int = 5,
        window_seconds: float = 300.0,
        path: Path | None = None,
        audit: AuditRecorder | None = None,
        hooks: StageHooks | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failures = failures
        self.window_seconds = window_seconds
        self.path = path
        self.audit: AuditRecorder = audit or NullAuditRecorder()
        self.hooks = hooks
        self._clock = clock
        self._recent: dict[Key, deque[float]] = {}
        self._quarantined: dict[Key, QuarantinedRule] = {}
        self._lock = threading.Lock()
        if path is not None:
            for q in read_quarantine(path):
                self._quarantined[(q.tenant, q.rule_id, q.version)] = q

    @staticmethod
    def from_settings(
        settings: Settings, *, audit: AuditRecorder | None = None, hooks: StageHooks | None = None
    ) -> RuleQuarantine:
        r = settings.resilience
        return RuleQuarantine(
            failures=r.quarantine_failures,
            window_seconds=r.quarantine_window_seconds,
            path=settings.data_dir / QUARANTINE_FILE,
            audit=audit,
            hooks=hooks,
        )

    def is_quarantined(self, rule: Rule) -> bool:
        return key_of(rule) in self._quarantined

    def allowed(self, compiled: list[Any]) -> list[Any]:
        """``compiled`` (objects with a ``rule``) without the quarantined ones."""
        if not self._quarantined:
            return compiled
        return [c for c in compiled if key_of(c.rule) not in self._quarantined]

    def quarantined(self) -> list[QuarantinedRule]:
        with self._lock:
            return sorted(self._quarantined.values(), key=lambda q: (q.tenant, q.rule_id, q.version))

    def success(self, rule: Rule) -> None:
        """A clean evaluation clears the rule's failure streak."""
        if self._recent:
            self._recent.pop(key_of(rule), None)

    def failure(self, rule: Rule, exc: BaseException) -> bool:
        """Count one failed evaluation; return True if the rule is now quarantined."""
        key = key_of(rule)
        now = self._clock()
        with self._lock:
            if key in self._quarantined:
                return True
            recent = self._recent.setdefault(key, deque())
            recent.append(now)
            while recent and recent[0] < now - self.window_seconds:
                recent.popleft()
            if len(recent) < self.failures:
                logger.warning(
                    "rule %s/%s v%d failed (%d of %d before quarantine): %s",
                    rule.tenant,
                    rule.id,
                    rule.version,
                    len(recent),
                    self.failures,
                    exc,
                )
                return False
            reason = f"{type(exc).__name__}: {exc}"[:500]
            entry = QuarantinedRule(
                tenant=rule.tenant,
                rule_id=rule.id,
                version=rule.version,
                reason=reason,
                failures=len(recent),
                since=datetime.now(UTC).isoformat(timespec="seconds"),
            )
            self._quarantined[key] = entry
            self._recent.pop(key, None)
            count = sum(1 for k in self._quarantined if k[0] == rule.tenant)
        logger.error(
            "rule %s/%s v%d quarantined after %d failures in %.0fs: %s; other rules keep running,"
            " publish a new version to lift it",
            rule.tenant,
            rule.id,
            rule.version,
            entry.failures,
            self.window_seconds,
            reason,
        )
        if self.hooks is not None:
            self.hooks.count("betrace_rule_quarantines_total", tenant=rule.tenant, rule=rule.id)
            self.hooks.gauge("betrace_rules_quarantined", count, tenant=rule.tenant)
        self.audit.record(
            AuditEventType.RULE_QUARANTINED,
            actor="worker",
            subject=f"{rule.tenant}/{rule.id}",
            outcome="quarantined",
            tenant=rule.tenant,
            payload={"version": rule.version, "reason": reason, "failures": entry.failures},
        )
        self._save()
        return True

    def forget_superseded(self, live: set[Key]) -> None:
        """Drop quarantine entries of rule versions no longer in force (a new version lifts it)."""
        with self._lock:
            gone = [k for k in self._quarantined if k not in live]
            for k in gone:
                q = self._quarantined.pop(k)
                logger.warning(
                    "rule %s/%s v%d is no longer in force; its quarantine is lifted",
                    q.tenant,
                    q.rule_id,
                    q.version,
                )
        if gone:
            if self.hooks is not None:
                for tenant in {k[0] for k in gone}:
                    count = sum(1 for k in self._quarantined if k[0] == tenant)
                    self.hooks.gauge("betrace_rules_quarantined", count, tenant=tenant)
            self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        docs = [asdict(q) for q in self.quarantined()]
        tmp = self.path.with_suffix(".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(docs, indent=1))
            os.replace(tmp, self.path)
        except OSError as exc:
            logger.warning("cannot save the rule quarantine to %s: %s", self.path, exc)
