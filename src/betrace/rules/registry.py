"""Rules as versioned data: the record layout of the rules topic and its state.

The source of truth is a compacted Kafka topic (default ``betrace.rules``).
Every version of every rule is one record::

    key   = "<tenant>/<rule id>/<version>/<digest>"
    value = canonical JSON of the version (see :func:`encode`)

``digest`` is the first 16 hex digits of the SHA-256 of the value bytes. As
no two different versions ever share a key, compaction (which keeps the
latest record per key) never drops history; and the key is never written
with a null value (a tombstone). The digest also makes two concurrent
writers of "version 3" of one rule land on *different* keys, so both survive
compaction and every reader resolves the race the same way: the record with
the lower offset wins (records of one rule go to one partition, and
compaction preserves offsets). The loser is ignored and its writer, which
reads its record back, reports the conflict. (This stays stable under
compaction as long as nobody re-produces an old record byte for byte later
in the log; BeTrace never does, and the idempotent producer suppresses
retry duplicates.)

A disable is a new version with ``enabled=false``; nothing is ever deleted.
This module holds no I/O: :mod:`betrace.rules.store` moves the records.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import orjson

from betrace.errors import RuleError, RuleSyntaxError
from betrace.rules.engine import compile_rule
from betrace.rules.model import LANGUAGES, SEVERITIES, CompiledRule, Rule

logger = logging.getLogger(__name__)

#: Version of the record value layout; readers skip records of a newer format.
RECORD_FORMAT = 1
DEFAULT_TOPIC = "betrace.rules"
TENANT_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
RULE_ID_RE = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
_DIGEST_LEN = 16
#: Fields whose change makes a new version; author, time and reason describe the change.
CONTENT_FIELDS = ("name", "expression", "severity", "language", "enabled", "description")

RuleKey = tuple[str, str]  # (tenant, rule id)


@dataclass(frozen=True, slots=True)
class RuleVersion:
    """One immutable version of a rule plus who made it, when and why."""

    rule: Rule
    author: str
    created_at: datetime
    reason: str

    @property
    def key(self) -> RuleKey:
        return (self.rule.tenant, self.rule.id)

    def to_dict(self) -> dict[str, Any]:
        rule = self.rule
        return {
            "format": RECORD_FORMAT,
            "tenant": rule.tenant,
            "id": rule.id,
            "version": rule.version,
            "name": rule.name,
            "severity": rule.severity,
            "language": rule.language,
            "expression": rule.expression,
            "enabled": rule.enabled,
            "description": rule.description,
            "author": self.author,
            "created_at": self.created_at.astimezone(UTC).isoformat(timespec="milliseconds"),
            "reason": self.reason,
        }


def parse_ref(ref: str) -> RuleKey:
    """``TENANT/ID`` -> ``(tenant, id)``, validated."""
    tenant, sep, rule_id = ref.partition("/")
    if not sep:
        msg = f"expected TENANT/RULE_ID, got {ref!r}"
        raise RuleError(msg)
    check_names(tenant, rule_id)
    return tenant, rule_id


def check_names(tenant: str, rule_id: str) -> None:
    if not TENANT_RE.fullmatch(tenant):
        msg = f"invalid tenant {tenant!r}: use 1-64 of A-Z a-z 0-9 _ . -"
        raise RuleError(msg)
    if not RULE_ID_RE.fullmatch(rule_id):
        msg = f"invalid rule id {rule_id!r}: use 1-128 of A-Z a-z 0-9 _ . -"
        raise RuleError(msg)


# -- record encoding ---------------------------------------------------------------


def digest(value: bytes) -> str:
    return hashlib.sha256(value).hexdigest()[:_DIGEST_LEN]


def encode(version: RuleVersion) -> tuple[bytes, bytes]:
    """The (key, value) record of ``version``; the value is canonical (sorted keys)."""
    value = orjson.dumps(version.to_dict(), option=orjson.OPT_SORT_KEYS)
    rule = version.rule
    key = f"{rule.tenant}/{rule.id}/{rule.version}/{digest(value)}".encode()
    return key, value


def partition_for(tenant: str, rule_id: str, partitions: int) -> int:
    """All versions of one rule share a partition, so their offsets order them."""
    h = hashlib.sha256(f"{tenant}/{rule_id}".encode()).digest()
    return int.from_bytes(h[:4], "big") % max(1, partitions)


def decode(key: bytes | None, value: bytes | None) -> tuple[RuleVersion, str]:
    """Parse and verify one record; raise :class:`RuleError` if it is not a valid version."""
    if key is None or value is None:
        msg = "record without key or value (rules are never deleted; tombstones are invalid)"
        raise RuleError(msg)
    parts = key.decode("utf-8", "replace").split("/")
    if len(parts) != 4:  # tenant/id/version/digest
        msg = f"malformed rule record key {key!r}"
        raise RuleError(msg)
    if parts[3] != digest(value):
        msg = f"rule record {key!r}: value does not match the key's digest"
        raise RuleError(msg)
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        msg = f"rule record {key!r}: invalid JSON: {exc}"
        raise RuleError(msg) from None
    if not isinstance(doc, dict):
        msg = f"rule record {key!r}: value is not a JSON object"
        raise RuleError(msg)
    if doc.get("format") != RECORD_FORMAT:
        msg = f"rule record {key!r}: unsupported format {doc.get('format')!r} (upgrade BeTrace)"
        raise RuleError(msg)
    try:
        version = _from_dict(doc)
    except (KeyError, TypeError, ValueError) as exc:
        msg = f"rule record {key!r}: invalid field: {exc}"
        raise RuleError(msg) from None
    rule = version.rule
    if [rule.tenant, rule.id, str(rule.version)] != parts[:3]:
        msg = f"rule record {key!r}: key does not match the value's tenant/id/version"
        raise RuleError(msg)
    return version, parts[3]


def _from_dict(doc: dict[str, Any]) -> RuleVersion:
    def text(name: str) -> str:
        value = doc[name]
        if not isinstance(value, str):
            msg = f"{name} must be a string"
            raise TypeError(msg)
        return value

    number = doc["version"]
    if not isinstance(number, int) or isinstance(number, bool) or number < 1:
        msg = "version must be a positive integer"
        raise ValueError(msg)
    enabled = doc["enabled"]
    if not isinstance(enabled, bool):
        msg = "enabled must be a boolean"
        raise TypeError(msg)
    rule = make_rule(
        tenant=text("tenant"),
        rule_id=text("id"),
        expression=text("expression"),
        name=text("name"),
        severity=text("severity"),
        language=text("language"),
        description=text("description"),
        version=number,
        enabled=enabled,
    )
    created = datetime.fromisoformat(text("created_at").replace("Z", "+00:00"))
    return RuleVersion(rule, author=text("author"), created_at=created, reason=text("reason"))


def make_rule(
    *,
    tenant: str,
    rule_id: str,
    expression: str,
    name: str = "",
    severity: str = "medium",
    language: str = "betrace",
    description: str = "",
    version: int = 1,
    enabled: bool = True,
) -> Rule:
    """A :class:`Rule` with every field checked (not compiled: see :func:`check_compiles`)."""
    check_names(tenant, rule_id)
    if severity not in SEVERITIES:
        msg = f"invalid severity {severity!r}; expected one of {', '.join(SEVERITIES)}"
        raise RuleError(msg)
    if language not in LANGUAGES:
        msg = f"invalid language {language!r}; expected one of {', '.join(LANGUAGES)}"
        raise RuleError(msg)
    return Rule(
        id=rule_id,
        tenant=tenant,
        name=name or rule_id,
        expression=expression,
        severity=severity,
        language=language,
        version=version,
        enabled=enabled,
        description=description,
    )


def check_compiles(rule: Rule) -> None:
    """Raise :class:`RuleError` (with line/column/caret for syntax) unless ``rule`` compiles."""
    try:
        compile_rule(rule)
    except RuleSyntaxError as exc:
        msg = f"rule {rule.tenant}/{rule.id}: {exc}"
        raise RuleSyntaxError(msg, line=exc.line, column=exc.column) from None
    except RuleError as exc:
        msg = f"rule {rule.tenant}/{rule.id}: {exc}"
        raise RuleError(msg) from None


# -- state ----------------------------------------------------------------------------


class Applied(enum.Enum):
    """What applying one record did to a :class:`RegistryState`."""

    NEW = "new"
    DUPLICATE = "duplicate"  # the same record again (replay, re-publish)
    CONFLICT = "conflict"  # another record already holds this version: ignored


@dataclass(frozen=True, slots=True)
class _Entry:
    version: RuleVersion
    digest: str


class RegistryState:
    """Every version of every rule, folded from the topic in offset order."""

    def __init__(self) -> None:
        self._rules: dict[RuleKey, dict[int, _Entry]] = {}

    def apply(self, version: RuleVersion, record_digest: str) -> Applied:
        versions = self._rules.setdefault(version.key, {})
        number = version.rule.version
        existing = versions.get(number)
        if existing is not None:
            return Applied.DUPLICATE if existing.digest == record_digest else Applied.CONFLICT
        versions[number] = _Entry(version, record_digest)
        return Applied.NEW

    def apply_record(self, key: bytes | None, value: bytes | None) -> Applied | None:
        """Decode and apply one record; an invalid record is logged and skipped (None)."""
        try:
            version, record_digest = decode(key, value)
        except RuleError as exc:
            logger.error("skipping invalid rules record: %s", exc)  # noqa: TRY400 - expected data error
            return None
        outcome = self.apply(version, record_digest)
        if outcome is Applied.CONFLICT:
            held = self._rules[version.key][version.rule.version].version
            if held.rule == version.rule and held.author == version.author:
                # Workers that start together each seed the same YAML rule; only the time differs.
                logger.info(
                    "%s/%s v%d was published twice with the same definition; keeping the first",
                    *version.key,
                    version.rule.version,
                )
                return outcome
            logger.warning(
                "ignoring a conflicting record for %s/%s v%d (an earlier record holds that version)",
                *version.key,
                version.rule.version,
            )
        return outcome

    def digest_of(self, tenant: str, rule_id: str, number: int) -> str | None:
        entry = self._rules.get((tenant, rule_id), {}).get(number)
        return None if entry is None else entry.digest

    def rule_keys(self) -> list[RuleKey]:
        return sorted(self._rules)

    def history(self, tenant: str, rule_id: str) -> list[RuleVersion]:
        """Every version of one rule, oldest first (empty if unknown)."""
        versions = self._rules.get((tenant, rule_id), {})
        return [versions[n].version for n in sorted(versions)]

    def latest(self, tenant: str, rule_id: str) -> RuleVersion | None:
        versions = self._rules.get((tenant, rule_id))
        return versions[max(versions)].version if versions else None

    def get(self, tenant: str, rule_id: str, number: int | None = None) -> RuleVersion:
        """One version (the latest when ``number`` is None); raise :class:`RuleError` if absent."""
        history = self.history(tenant, rule_id)
        if not history:
            msg = f"no rule {tenant}/{rule_id}"
            raise RuleError(msg)
        if number is None:
            return history[-1]
        for version in history:
            if version.rule.version == number:
                return version
        known = ", ".join(str(v.rule.version) for v in history)
        msg = f"rule {tenant}/{rule_id} has no version {number} (versions: {known})"
        raise RuleError(msg)

    def latest_all(self, *, include_disabled: bool = False, tenant: str | None = None) -> list[RuleVersion]:
        """The latest version of each rule, by tenant and id."""
        out = []
        for key in self.rule_keys():
            if tenant is not None and key[0] != tenant:
                continue
            latest = self.latest(*key)
            if latest is not None and (include_disabled or latest.rule.enabled):
                out.append(latest)
        return out

    def active(self, compile_fn: Callable[[Rule], CompiledRule] = compile_rule) -> list[CompiledRule]:
        """The compiled rule in force for each rule key.

        That is the latest version, unless it does not compile (a defensive
        check: ``add`` rejects such versions): then it is skipped with an
        error and the newest earlier version that compiles stays in force. A
        disabled version ends the walk: the rule is not evaluated.
        """
        out: list[CompiledRule] = []
        for key in self.rule_keys():
            for version in reversed(self.history(*key)):
                rule = version.rule
                if not rule.enabled:
                    break
                try:
                    out.append(compile_fn(rule))
                    break
                except RuleError as exc:
                    logger.error(  # noqa: TRY400 - expected data error, no traceback
                        "rule %s/%s v%d does not compile, skipped: %s", *key, rule.version, exc
                    )
        return out


# -- making versions -----------------------------------------------------------------


def now_utc() -> datetime:
    """Now, at the millisecond precision records keep (so a version round-trips exactly)."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def propose(
    state: RegistryState,
    rule: Rule,
    *,
    author: str,
    reason: str,
    at: datetime | None = None,
) -> RuleVersion | None:
    """The next version of ``rule`` (its own ``version`` is ignored), or None if unchanged.

    Raises :class:`RuleError` if the rule does not compile: a broken version
    never reaches the topic.
    """
    if not author.strip():
        msg = "an author is required (--author or $USER)"
        raise RuleError(msg)
    check_names(rule.tenant, rule.id)
    latest = state.latest(rule.tenant, rule.id)
    if latest is not None and _content(latest.rule) == _content(rule):
        return None
    if rule.enabled:
        check_compiles(rule)
    number = 1 if latest is None else latest.rule.version + 1
    return RuleVersion(
        replace(rule, version=number), author=author, created_at=at or now_utc(), reason=reason
    )


def set_enabled(
    state: RegistryState,
    tenant: str,
    rule_id: str,
    *,
    enabled: bool,
    author: str,
    reason: str,
    at: datetime | None = None,
) -> RuleVersion:
    """A new version of the latest one with ``enabled`` flipped; error if already so."""
    latest = state.get(tenant, rule_id)
    if latest.rule.enabled == enabled:
        state_word = "enabled" if enabled else "disabled"
        msg = f"rule {tenant}/{rule_id} is already {state_word} (v{latest.rule.version})"
        raise RuleError(msg)
    if not reason.strip():
        msg = "a reason is required (--reason)"
        raise RuleError(msg)
    version = propose(state, replace(latest.rule, enabled=enabled), author=author, reason=reason, at=at)
    assert version is not None  # enabled changed, so the content did
    return version


def seed_versions(
    state: RegistryState, rules: Iterable[Rule], *, author: str, reason: str
) -> list[RuleVersion]:
    """Version 1 of each rule that has no version at all yet (bootstrap from YAML)."""
    out = []
    for rule in rules:
        if state.latest(rule.tenant, rule.id) is None:
            version = propose(state, rule, author=author, reason=reason)
            if version is not None:
                out.append(version)
    return out


def _content(rule: Rule) -> tuple[object, ...]:
    return tuple(getattr(rule, name) for name in CONTENT_FIELDS)
