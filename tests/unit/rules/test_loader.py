"""Loading per-tenant rule files: validation, whole-file rejection and conflicts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from betrace.errors import RuleError
from betrace.rules.loader import RuleSet, load_rules, parse_rule_file
from betrace.rules.model import Rule

ROOT = Path(__file__).resolve().parents[3]

ACME = """\
tenant: acme
rules:
  - id: pii-audit
    name: PII access is audited
    severity: high
    expression: when { pii.access } always { audit.log }
  - id: slow-db
    language: traceql
    version: 3
    expression: '{ name = "db.query" && duration > 500ms }'
  - id: old-rule
    enabled: false
    expression: when { a } never { b }
"""
GLOBEX = """\
# comments are fine
tenant: globex
rules:
  - id: pii-audit
    severity: low
    expression: when { pii.access } always { audit.log }
"""


def write(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def test_valid_directory_loads_every_tenant(tmp_path: Path) -> None:
    write(tmp_path, "acme.yaml", ACME)
    write(tmp_path, "globex.yml", GLOBEX)
    write(tmp_path, "README.md", "not a rule file")
    ruleset = load_rules(tmp_path)

    assert isinstance(ruleset, RuleSet)
    assert [(r.tenant, r.id) for r in ruleset.rules] == [
        ("acme", "pii-audit"),
        ("acme", "slow-db"),
        ("acme", "old-rule"),
        ("globex", "pii-audit"),
    ]
    assert set(ruleset.tenants) == {"acme", "globex"}
    # Disabled rules are listed but never evaluated.
    assert [c.rule.id for c in ruleset.for_tenant("acme")] == ["pii-audit", "slow-db"]
    assert [c.rule.severity for c in ruleset.for_tenant("globex")] == ["low"]
    assert ruleset.for_tenant("nobody") == []


def test_rule_fields_and_defaults(tmp_path: Path) -> None:
    rules = {r.id: r for r in parse_rule_file(write(tmp_path, "acme.yaml", ACME))}
    assert rules["pii-audit"] == Rule(
        id="pii-audit",
        tenant="acme",
        name="PII access is audited",
        expression="when { pii.access } always { audit.log }",
        severity="high",
    )
    slow = rules["slow-db"]
    assert (slow.language, slow.version, slow.severity, slow.name, slow.enabled) == (
        "traceql",
        3,
        "medium",
        "",
        True,
    )
    assert rules["old-rule"].enabled is False


def test_repository_rules_are_valid() -> None:
    ruleset = load_rules(ROOT / "config" / "rules")
    assert set(ruleset.tenants) == {"default", "acme"}
    for tenant in ("default", "acme"):
        assert {c.rule.id for c in ruleset.for_tenant(tenant)} == {"pii-audit", "payment-fraud-check"}


def test_empty_directory_loads_nothing(tmp_path: Path) -> None:
    ruleset = load_rules(tmp_path)
    assert ruleset.rules == []
    assert dict(ruleset.tenants) == {}


def test_a_rule_that_does_not_compile_rejects_the_whole_file(tmp_path: Path) -> None:
    bad = write(
        tmp_path,
        "acme.yaml",
        ACME + "  - id: broken-rule\n    expression: when { pii.access always { audit.log }\n",
    )
    write(tmp_path, "globex.yaml", GLOBEX)
    with pytest.raises(RuleError) as info:
        load_rules(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{bad}: rule 'broken-rule': ")
    assert "line 1, column" in message
    with pytest.raises(RuleError, match="broken-rule"):
        parse_rule_file(bad)


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("tenant: acme\nrules:\n  - id: x\n    expression: ''\n", ["rules.0.expression"]),
        ("tenant: acme\nrules:\n  - id: x\n", ["rules.0.expression", "Field required"]),
        ("tenant: acme\nrules:\n  - id: bad id!\n    expression: when { a } always { b }\n", ["rules.0.id"]),
        ("tenant: acme\nrules:\n  - id: x\n    expression: e\n    colour: red\n", ["rules.0.colour"]),
        ("tenant: acme\nrules:\n  - id: x\n    expression: e\n    version: 0\n", ["rules.0.version"]),
        ("tenant: acme\nrules:\n  - id: x\n    expression: e\n    language: sql\n", ["rules.0.language"]),
        ("tenant: 'a b'\nrules: []\n", ["tenant"]),
        ("rules: []\n", ["tenant", "Field required"]),
        ("", ["invalid rule file"]),
        ("- just\n- a list\n", ["invalid rule file"]),
    ],
)
def test_schema_problems_name_the_file_and_field(tmp_path: Path, text: str, fragments: list[str]) -> None:
    path = write(tmp_path, "acme.yaml", text)
    with pytest.raises(RuleError) as info:
        load_rules(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{path}: invalid rule file: ")
    for fragment in fragments:
        assert fragment in message


def test_schema_problem_names_the_rule_id(tmp_path: Path) -> None:
    bad = "  - id: loud-rule\n    severity: urgent\n    expression: when { a } always { b }\n"
    write(tmp_path, "acme.yaml", GLOBEX.replace("globex", "acme") + bad)
    with pytest.raises(RuleError) as info:
        load_rules(tmp_path)
    assert "loud-rule" in str(info.value)


def test_unreadable_yaml_is_a_rule_error(tmp_path: Path) -> None:
    path = write(tmp_path, "acme.yaml", "tenant: acme\nrules: [\n")
    with pytest.raises(RuleError, match=re.escape(f"{path}: cannot read rules")):
        load_rules(tmp_path)


def test_non_utf8_file_is_a_rule_error(tmp_path: Path) -> None:
    (tmp_path / "acme.yaml").write_bytes(b"\xff\xfetenant: acme\n")
    with pytest.raises(RuleError, match=r"acme\.yaml"):
        load_rules(tmp_path)


def test_duplicate_rule_ids_in_one_file(tmp_path: Path) -> None:
    path = write(tmp_path, "acme.yaml", ACME + "  - id: slow-db\n    expression: when { x } always { y }\n")
    with pytest.raises(RuleError) as info:
        load_rules(tmp_path)
    assert str(info.value) == f"{path}: duplicate rule id 'slow-db'"


def test_same_rule_id_in_two_tenants_is_fine(tmp_path: Path) -> None:
    write(tmp_path, "acme.yaml", ACME)
    write(tmp_path, "globex.yaml", GLOBEX)
    ids = [(r.tenant, r.id) for r in load_rules(tmp_path).rules if r.id == "pii-audit"]
    assert ids == [("acme", "pii-audit"), ("globex", "pii-audit")]


def test_duplicate_tenant_across_files(tmp_path: Path) -> None:
    first = write(tmp_path, "a-acme.yaml", ACME)
    second = write(tmp_path, "b-acme.yml", GLOBEX.replace("globex", "acme"))
    with pytest.raises(RuleError) as info:
        load_rules(tmp_path)
    assert str(info.value) == f"{second}: tenant 'acme' already defined in {first}"


def test_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    with pytest.raises(RuleError) as info:
        load_rules(missing)
    assert str(missing) in str(info.value)
    assert "BETRACE_RULES_DIR" in str(info.value)


def test_a_file_is_not_a_rules_directory(tmp_path: Path) -> None:
    with pytest.raises(RuleError, match="does not exist"):
        load_rules(write(tmp_path, "acme.yaml", ACME))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RuleError, match="cannot read rules"):
        parse_rule_file(tmp_path / "gone.yaml")
