"""Rules as versioned data: record layout, versioning, immutability, compaction safety."""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from betrace.errors import RuleError, RuleSyntaxError
from betrace.rules.loader import RuleSet
from betrace.rules.model import Rule
from betrace.rules.registry import (
    Applied,
    RegistryState,
    RuleVersion,
    decode,
    digest,
    encode,
    parse_ref,
    partition_for,
    propose,
    seed_versions,
    set_enabled,
)

AT = datetime(2026, 11, 25, 3, 0, tzinfo=UTC)
PII = Rule(
    id="pii-audit",
    tenant="acme",
    name="PII is audited",
    expression="when { pii.access } always { audit.log }",
    severity="high",
)

Record = tuple[bytes, bytes]


def fold(records: list[Record]) -> RegistryState:
    state = RegistryState()
    for key, value in records:
        state.apply_record(key, value)
    return state


def compact(records: list[Record]) -> list[Record]:
    """What Kafka log compaction may leave: the last record per key, at its offset."""
    last = {key: i for i, (key, _) in enumerate(records)}
    return [r for i, r in enumerate(records) if last[r[0]] == i]


def publish(state: RegistryState, log: list[Record], version: RuleVersion | None) -> RuleVersion:
    assert version is not None
    record = encode(version)
    log.append(record)
    assert state.apply_record(*record) is Applied.NEW
    return version


def test_record_layout() -> None:
    v1 = propose(RegistryState(), PII, author="ana", reason="GDPR", at=AT)
    assert v1 is not None
    key, value = encode(v1)
    tenant, rule_id, number, value_digest = key.decode().split("/")
    assert (tenant, rule_id, number) == ("acme", "pii-audit", "1")
    assert value_digest == digest(value)
    doc = orjson.loads(value)
    assert doc == {
        "format": 1,
        "tenant": "acme",
        "id": "pii-audit",
        "version": 1,
        "name": "PII is audited",
        "severity": "high",
        "language": "betrace",
        "expression": PII.expression,
        "enabled": True,
        "description": "",
        "author": "ana",
        "created_at": "2026-11-25T03:00:00.000+00:00",
        "reason": "GDPR",
    }
    assert value == orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)  # canonical
    decoded, decoded_digest = decode(key, value)
    assert decoded == v1
    assert decoded_digest == value_digest


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda k, v: (k, None), "tombstone"),
        (lambda k, v: (None, v), "without key"),
        (lambda k, v: (k, v.replace(b"ana", b"bob")), "digest"),
        (lambda k, v: (b"acme/pii-audit/1", v), "malformed"),
        (lambda k, v: (k.replace(b"/1/", b"/2/"), v), "does not match the value"),
        (lambda k, v: (k.replace(b"acme/", b"globex/"), v), "does not match the value"),
    ],
)
def test_invalid_records_are_rejected(mutate: object, error: str) -> None:
    v1 = propose(RegistryState(), PII, author="ana", reason="r", at=AT)
    assert v1 is not None
    key, value = mutate(*encode(v1))  # type: ignore[operator]
    with pytest.raises(RuleError, match=error):
        decode(key, value)


def test_future_record_format_is_skipped_with_an_error(caplog: pytest.LogCaptureFixture) -> None:
    value = orjson.dumps({"format": 2, "tenant": "acme"})
    key = f"acme/x/1/{digest(value)}".encode()
    state = RegistryState()
    assert state.apply_record(key, value) is None
    assert state.rule_keys() == []
    assert "unsupported format 2" in caplog.text


def test_every_change_is_a_new_version_with_author_time_and_reason() -> None:
    state, log = RegistryState(), []
    v1 = publish(state, log, propose(state, replace(PII, version=7), author="ana", reason="initial", at=AT))
    assert v1.rule.version == 1  # the registry numbers versions, not the caller
    assert propose(state, PII, author="bob", reason="again") is None  # unchanged: nothing to publish
    changed = replace(PII, severity="critical")
    v2 = publish(state, log, propose(state, changed, author="bob", reason="raise severity"))
    assert (v2.rule.version, v2.rule.severity, v2.author, v2.reason) == (
        2,
        "critical",
        "bob",
        "raise severity",
    )
    assert [v.rule.version for v in state.history("acme", "pii-audit")] == [1, 2]
    assert state.get("acme", "pii-audit", 1) == v1  # old versions stay readable, unchanged
    assert state.latest("acme", "pii-audit") == v2


def test_a_version_that_does_not_compile_is_rejected_with_a_caret() -> None:
    broken = replace(PII, expression="when { pii.access\n  always { audit.log }")
    with pytest.raises(RuleSyntaxError) as info:
        propose(RegistryState(), broken, author="ana", reason="r")
    assert (info.value.line, info.value.column) == (2, 3)
    assert "acme/pii-audit" in str(info.value)
    assert str(info.value).endswith("  always { audit.log }\n    ^")


@pytest.mark.parametrize(("author", "match"), [("", "author")])
def test_author_is_required(author: str, match: str) -> None:
    with pytest.raises(RuleError, match=match):
        propose(RegistryState(), PII, author=author, reason="r")


def test_same_record_twice_is_a_duplicate_and_another_is_a_conflict() -> None:
    state = RegistryState()
    mine = propose(state, PII, author="ana", reason="r", at=AT)
    theirs = propose(state, replace(PII, severity="low"), author="bob", reason="r", at=AT)
    assert mine is not None
    assert theirs is not None
    assert mine.rule.version == theirs.rule.version == 1
    assert state.apply_record(*encode(mine)) is Applied.NEW
    assert state.apply_record(*encode(mine)) is Applied.DUPLICATE
    assert state.apply_record(*encode(theirs)) is Applied.CONFLICT
    assert state.latest("acme", "pii-audit") == mine  # the first record of a version wins
    assert encode(mine)[0] != encode(theirs)[0]  # so compaction keeps both


def test_disable_is_a_new_version_and_history_is_kept() -> None:
    state, log = RegistryState(), []
    publish(state, log, propose(state, PII, author="ana", reason="initial"))
    v2 = publish(
        state, log, set_enabled(state, "acme", "pii-audit", enabled=False, author="bob", reason="noisy")
    )
    assert (v2.rule.version, v2.rule.enabled, v2.rule.expression) == (2, False, PII.expression)
    assert state.active() == []
    assert state.latest_all() == []
    assert state.latest_all(include_disabled=True) == [v2]
    with pytest.raises(RuleError, match="already disabled"):
        set_enabled(state, "acme", "pii-audit", enabled=False, author="bob", reason="again")
    v3 = publish(
        state, log, set_enabled(state, "acme", "pii-audit", enabled=True, author="ana", reason="fixed")
    )
    assert [c.rule.version for c in state.active()] == [v3.rule.version] == [3]
    assert [v.rule.enabled for v in state.history("acme", "pii-audit")] == [True, False, True]


def test_disable_needs_a_reason_and_an_existing_rule() -> None:
    state, log = RegistryState(), []
    with pytest.raises(RuleError, match="no rule acme/pii-audit"):
        set_enabled(state, "acme", "pii-audit", enabled=False, author="a", reason="r")
    publish(state, log, propose(state, PII, author="ana", reason="initial"))
    with pytest.raises(RuleError, match="reason"):
        set_enabled(state, "acme", "pii-audit", enabled=False, author="a", reason=" ")


def test_compaction_never_loses_history_or_changes_the_outcome() -> None:
    state, log = RegistryState(), []
    publish(state, log, propose(state, PII, author="ana", reason="v1"))
    publish(state, log, propose(state, replace(PII, severity="low"), author="ana", reason="v2"))
    # A concurrent writer also made "v2"; it lands later in the log and loses.
    loser = RuleVersion(
        replace(PII, version=2, severity="critical"), author="bob", created_at=AT, reason="race"
    )
    log.append(encode(loser))
    publish(state, log, set_enabled(state, "acme", "pii-audit", enabled=False, author="ana", reason="v3"))
    other = replace(PII, tenant="globex")
    publish(state, log, propose(state, other, author="gus", reason="globex v1"))
    log.append(log[0])  # a duplicate of an uncontested record (e.g. an old client's retry)
    compacted = compact(log)
    assert len(compacted) == 5  # 4 versions + the losing record: nothing of value dropped
    before, after = fold(log), fold(compacted)
    for key in before.rule_keys():
        assert before.history(*key) == after.history(*key)
    assert after.get("acme", "pii-audit", 2).rule.severity == "low"
    assert [v.rule.version for v in after.history("acme", "pii-audit")] == [1, 2, 3]


def test_a_broken_latest_version_falls_back_to_the_previous_one(caplog: pytest.LogCaptureFixture) -> None:
    state, log = RegistryState(), []
    publish(state, log, propose(state, PII, author="ana", reason="v1"))
    # Written by something that skipped validation: readers skip it defensively.
    bad = RuleVersion(
        replace(PII, version=2, expression="when { oops"), author="x", created_at=AT, reason="r"
    )
    state.apply_record(*encode(bad))
    with caplog.at_level(logging.ERROR):
        [compiled] = state.active()
    assert compiled.rule.version == 1
    assert "acme/pii-audit v2 does not compile, skipped" in caplog.text


def test_rule_sets_are_isolated_per_tenant() -> None:
    state, log = RegistryState(), []
    publish(state, log, propose(state, PII, author="ana", reason="r"))
    publish(state, log, propose(state, replace(PII, tenant="globex", id="other"), author="gus", reason="r"))
    ruleset = RuleSet.from_compiled(state.active())
    assert [c.rule.id for c in ruleset.for_tenant("acme")] == ["pii-audit"]
    assert [c.rule.id for c in ruleset.for_tenant("globex")] == ["other"]
    assert ruleset.for_tenant("initech") == []
    assert ruleset.current() is ruleset


def test_seed_only_creates_rules_that_have_no_version() -> None:
    state, log = RegistryState(), []
    publish(state, log, propose(state, replace(PII, severity="low"), author="ana", reason="r"))
    payment = Rule(id="fraud", tenant="acme", name="f", expression="when { charge } always { check }")
    seeds = seed_versions(state, [PII, payment], author="seed", reason="yaml")
    assert [(v.rule.id, v.rule.version) for v in seeds] == [("fraud", 1)]


def test_partition_is_stable_per_rule() -> None:
    assert partition_for("acme", "pii-audit", 1) == 0
    picks = {partition_for("acme", "pii-audit", 12) for _ in range(3)}
    assert len(picks) == 1
    assert 0 <= picks.pop() < 12


@pytest.mark.parametrize("ref", ["acme", "acme/", "/x", "ac me/x", "acme/x/y"])
def test_bad_references(ref: str) -> None:
    with pytest.raises(RuleError):
        parse_ref(ref)


def test_get_unknown_version_lists_the_known_ones() -> None:
    state, log = RegistryState(), []
    publish(state, log, propose(state, PII, author="ana", reason="r"))
    with pytest.raises(RuleError, match=r"no version 4 \(versions: 1\)"):
        state.get("acme", "pii-audit", 4)


def test_a_seed_published_twice_is_kept_once_and_only_a_real_conflict_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two workers starting together both seed v1 from YAML: same rule, another timestamp."""
    state = RegistryState()
    first = propose(state, PII, author="betrace-seed", reason="bootstrap", at=AT)
    again = propose(state, PII, author="betrace-seed", reason="bootstrap", at=AT + timedelta(seconds=2))
    other = propose(state, replace(PII, severity="low"), author="betrace-seed", reason="bootstrap", at=AT)
    assert first is not None and again is not None and other is not None
    assert state.apply_record(*encode(first)) is Applied.NEW
    with caplog.at_level(logging.INFO, logger="betrace.rules.registry"):
        assert state.apply_record(*encode(again)) is Applied.CONFLICT
        assert [r.levelno for r in caplog.records] == [logging.INFO]
        caplog.clear()
        assert state.apply_record(*encode(other)) is Applied.CONFLICT
        assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert state.latest("acme", "pii-audit") == first
