"""``betrace rules``: check and list the per-tenant rule files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from betrace.cli.common import fail_clearly, out, settings
from betrace.rules.loader import load_rules, parse_rule_file

app = typer.Typer(
    help="Validate and list rules (YAML files, one per tenant, under config/rules/).", no_args_is_help=True
)


@app.command()
def validate(
    paths: Annotated[
        list[Path] | None, typer.Argument(help="Rule files (default: every file in BETRACE_RULES_DIR).")
    ] = None,
) -> None:
    """Parse and compile rule files; print each problem with its file and rule id."""
    cfg = settings()
    with fail_clearly():
        if paths:
            total = 0
            for path in paths:
                total += len(parse_rule_file(path))
            out.print(f"{total} rule(s) in {len(paths)} file(s) are valid")
        else:
            ruleset = load_rules(cfg.rules_dir)
            counts = f"{len(ruleset.rules)} rule(s) for {len(ruleset.tenants)} tenant(s)"
            out.print(f"{counts} in {cfg.rules_dir} are valid")


@app.command("list")
def list_rules(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's rules.")] = None,
) -> None:
    """List the loaded rules: tenant, id, version, severity, state and expression."""
    cfg = settings()
    with fail_clearly():
        ruleset = load_rules(cfg.rules_dir)
    for rule in ruleset.rules:
        if tenant and rule.tenant != tenant:
            continue
        state = "enabled" if rule.enabled else "disabled"
        out.print(
            f"{rule.tenant}/{rule.id}@v{rule.version} [{rule.severity}, {rule.language}, {state}] "
            f"{rule.expression}",
            highlight=False,
            markup=False,
        )
