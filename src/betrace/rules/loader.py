"""Load per-tenant rules from YAML files under ``config/rules/``.

File format (one file per tenant; the file name does not matter)::

    tenant: acme
    rules:
      - id: pii-audit
        name: PII access is audited
        severity: high
        language: betrace
        expression: when { pii.access } always { audit.log }

A file that does not validate is rejected whole: no rule of it is loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from betrace.errors import RuleError
from betrace.rules.engine import compile_rule
from betrace.rules.model import CompiledRule, Language, Rule, Severity

logger = logging.getLogger(__name__)


class _RuleDoc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,128}$")
    name: str = ""
    expression: str = Field(min_length=1, max_length=10_000)
    severity: Severity = "medium"
    language: Language = "betrace"
    version: int = Field(1, ge=1)
    enabled: bool = True
    description: str = ""


class _RuleFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    rules: list[_RuleDoc] = Field(default_factory=list)


class RuleSet:
    """Compiled, enabled rules per tenant; never changes once built (swap a new one instead)."""

    def __init__(
        self, rules: Iterable[Rule], compile_fn: Callable[[Rule], CompiledRule] = compile_rule
    ) -> None:
        self._by_tenant: dict[str, list[CompiledRule]] = {}
        self.rules: list[Rule] = []
        for rule in rules:
            self.rules.append(rule)
            if rule.enabled:
                self._by_tenant.setdefault(rule.tenant, []).append(compile_fn(rule))

    @classmethod
    def from_compiled(cls, compiled: Iterable[CompiledRule]) -> RuleSet:
        items = list(compiled)
        by_rule = {id(c.rule): c for c in items}
        return cls([c.rule for c in items], lambda rule: by_rule[id(rule)])

    def for_tenant(self, tenant: str) -> list[CompiledRule]:
        return self._by_tenant.get(tenant, [])

    @property
    def tenants(self) -> Mapping[str, list[CompiledRule]]:
        return self._by_tenant

    def current(self) -> RuleSet:
        """A fixed rule set is its own :class:`RuleSource`."""
        return self


class RuleSource(Protocol):
    """Where the evaluate stage gets the rules for each batch (fixed, or hot-reloaded)."""

    def current(self) -> RuleSet:
        """The rule set in force now; one batch is evaluated with one rule set."""
        ...


def _location(raw: Any, loc: tuple[int | str, ...]) -> str:
    """``rules.1.severity``, plus the rule's id when it has one: ``rules.1.severity (rule 'x')``."""
    where = ".".join(str(p) for p in loc)
    if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int) and isinstance(raw, dict):
        rules = raw.get("rules")
        entry = rules[loc[1]] if isinstance(rules, list) and loc[1] < len(rules) else None
        if isinstance(entry, dict) and isinstance(entry.get("id"), str):
            where += f" (rule {entry['id']!r})"
    return where


def parse_rule_file(path: Path, compile_fn: Callable[[Rule], CompiledRule] = compile_rule) -> list[Rule]:
    """Validate and compile one tenant file; raise :class:`RuleError` naming the problem."""
    try:
        raw: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        msg = f"{path}: cannot read rules: {exc}"
        raise RuleError(msg) from None
    try:
        doc = _RuleFile.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{_location(raw, e['loc'])}: {e['msg']}" for e in exc.errors())
        msg = f"{path}: invalid rule file: {problems}"
        raise RuleError(msg) from None
    rules = [Rule(tenant=doc.tenant, **r.model_dump()) for r in doc.rules]
    seen: set[str] = set()
    for rule in rules:
        if rule.id in seen:
            msg = f"{path}: duplicate rule id {rule.id!r}"
            raise RuleError(msg)
        seen.add(rule.id)
        try:
            compile_fn(rule)
        except RuleError as exc:
            msg = f"{path}: rule {rule.id!r}: {exc}"
            raise RuleError(msg) from None
    return rules


def load_rules(rules_dir: Path, compile_fn: Callable[[Rule], CompiledRule] = compile_rule) -> RuleSet:
    """Load every ``*.yaml``/``*.yml`` file in ``rules_dir`` (``compile_fn``: e.g. a cache's)."""
    if not rules_dir.is_dir():
        msg = f"rules directory {rules_dir} does not exist (set BETRACE_RULES_DIR)"
        raise RuleError(msg)
    rules: list[Rule] = []
    tenants: dict[str, Path] = {}
    for path in sorted([*rules_dir.glob("*.yaml"), *rules_dir.glob("*.yml")]):
        file_rules = parse_rule_file(path, compile_fn)
        for rule in file_rules:
            if rule.tenant in tenants and tenants[rule.tenant] != path:
                msg = f"{path}: tenant {rule.tenant!r} already defined in {tenants[rule.tenant]}"
                raise RuleError(msg)
            tenants[rule.tenant] = path
        rules.extend(file_rules)
    logger.info("loaded %d rules for %d tenants from %s", len(rules), len(tenants), rules_dir)
    return RuleSet(rules, compile_fn)
