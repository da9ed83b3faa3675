"""Rule quarantine through the real evaluate stage and real compiled rules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from betrace.agents.evaluate import EvaluateStage
from betrace.audit.events import AuditEventType, EventRef
from betrace.errors import RuleEvaluationError
from betrace.metrics import InMemoryHooks
from betrace.resilience.quarantine import QUARANTINE_FILE, RuleQuarantine, key_of, read_quarantine
from betrace.rules.engine import compile_rule
from betrace.rules.loader import RuleSet
from betrace.rules.model import Rule
from betrace.streams.schemas import SPAN_SCHEMA


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[AuditEventType, dict[str, Any]]] = []

    def record(self, event_type: AuditEventType, **kw: Any) -> EventRef:
        self.events.append((event_type, kw))
        return EventRef.new()


def traces(n: int) -> pa.Table:
    return pa.table(
        {
            "tenant": ["acme"] * n,
            "trace_id": [f"{i:032x}" for i in range(n)],
            "span_id": [f"{i + 1:016x}" for i in range(n)],
            "parent_span_id": [None] * n,
            "name": ["pii.access"] * n,
            "service": ["svc"] * n,
            "kind": [1] * n,
            "status_code": [0] * n,
            "start_ns": list(range(n)),
            "end_ns": list(range(1, n + 1)),
            "attributes": ['{"k":1}'] * n,
            "resource_attributes": ['{"service.name":"svc"}'] * n,
            "produced_ms": [0] * n,
        },
        schema=SPAN_SCHEMA,
    )


def rule(rule_id: str, version: int = 1) -> Rule:
    return Rule(
        id=rule_id,
        tenant="acme",
        name=rule_id,
        expression="when { pii.access } always { audit.log }",
        version=version,
    )


def broken(r: Rule) -> Any:
    """A real compiled rule whose evaluation fails, as a rule hitting an engine bug would."""
    compiled = compile_rule(r)

    def fail(table: pa.Table, now_ns: int | None = None) -> list[Any]:
        msg = "attribute column vanished"
        raise KeyError(msg)

    compiled.evaluate = fail  # type: ignore[method-assign,assignment]
    return compiled


def test_failing_rule_is_quarantined_others_keep_running(tmp_path: Path) -> None:
    good, bad = rule("pii-audit"), rule("flaky")
    ruleset = RuleSet([good, bad], compile_fn=lambda r: broken(r) if r.id == "flaky" else compile_rule(r))
    hooks, audit = InMemoryHooks(), Recorder()
    quarantine = RuleQuarantine(failures=3, path=tmp_path / QUARANTINE_FILE, audit=audit, hooks=hooks)
    stage = EvaluateStage(ruleset, hooks)
    stage.quarantine = quarantine
    for _ in range(2):  # below the threshold the batch fails (retriable) so no verdict is lost
        with pytest.raises(RuleEvaluationError, match="acme/flaky v1 failed") as info:
            stage.evaluate(traces(5))
        assert info.value.retriable
    signals = stage.evaluate(traces(5))  # third failure: quarantined, the batch goes through
    assert {s["rule_id"] for s in signals} == {"pii-audit"} and len(signals) == 5
    assert quarantine.is_quarantined(bad) and not quarantine.is_quarantined(good)
    assert len(stage.evaluate(traces(3))) == 3  # no longer evaluated, no longer failing
    ((event, kw),) = audit.events
    assert event is AuditEventType.RULE_QUARANTINED
    assert kw["subject"] == "acme/flaky" and "attribute column vanished" in kw["payload"]["reason"]
    assert hooks.total("betrace_rule_quarantines_total", rule="flaky") == 1
    assert hooks.gauges[("betrace_rules_quarantined", (("tenant", "acme"),))] == 1
    (saved,) = read_quarantine(tmp_path / QUARANTINE_FILE)
    assert (saved.rule_id, saved.version, saved.failures) == ("flaky", 1, 3)
    # A restarted worker keeps the quarantine.
    assert RuleQuarantine(path=tmp_path / QUARANTINE_FILE).is_quarantined(bad)


def test_a_new_version_lifts_the_quarantine(tmp_path: Path) -> None:
    q = RuleQuarantine(failures=1, path=tmp_path / QUARANTINE_FILE)
    v1, v2 = rule("flaky", 1), rule("flaky", 2)
    assert q.failure(v1, ValueError("boom"))
    assert q.is_quarantined(v1) and not q.is_quarantined(v2)
    q.forget_superseded({key_of(v2)})
    assert q.quarantined() == []
    assert json.loads((tmp_path / QUARANTINE_FILE).read_text()) == []


def test_failures_outside_the_window_do_not_add_up() -> None:
    now = [0.0]
    q = RuleQuarantine(failures=2, window_seconds=10, clock=lambda: now[0])
    r = rule("flaky")
    assert not q.failure(r, ValueError("a"))
    now[0] = 11
    assert not q.failure(r, ValueError("b"))
    q.success(r)
    assert not q.failure(r, ValueError("c"))
    assert q.quarantined() == []


def test_rules_list_shows_the_quarantine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import logging
    import os

    from typer.testing import CliRunner

    from betrace.cli.main import app

    for name in list(os.environ):
        if name.startswith("BETRACE_"):
            monkeypatch.delenv(name)
    root = Path(__file__).resolve().parents[3]
    data = tmp_path / "data"
    q = RuleQuarantine(failures=1, path=data / QUARANTINE_FILE)
    q.failure(rule("pii-audit"), KeyError("attribute column vanished"))
    logger = logging.getLogger("betrace")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    try:
        env = {"BETRACE_DATA_DIR": str(data), "BETRACE_RULES_DIR": str(root / "config" / "rules")}
        env |= {"COLUMNS": "250", "NO_COLOR": "1"}
        result = CliRunner().invoke(app, ["rules", "list", "--files", "--tenant", "acme"], env=env)
        as_json = CliRunner().invoke(app, ["rules", "list", "--files", "--json", "--tenant", "acme"], env=env)
    finally:
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines() if line.startswith("acme/")}
    assert "QUARANTINED: KeyError: 'attribute column vanished'" in lines["acme/pii-audit@v1"]
    assert "QUARANTINED" not in lines["acme/payment-fraud-check@v1"]
    out = as_json.output
    docs = {d["id"]: d for d in json.loads(out[out.index("\n[") + 1 if not out.startswith("[") else 0 :])}
    assert docs["pii-audit"]["quarantined"].startswith("KeyError")
    assert docs["payment-fraud-check"]["quarantined"] is None
