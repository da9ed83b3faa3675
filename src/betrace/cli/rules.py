"""``betrace rules``: manage versioned rules on the compacted rules topic.

Read commands (list/show/history) and write commands (add/disable/enable)
talk to the broker; ``validate`` and ``test --expression`` work offline.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.markup import escape

from betrace.cli.common import console, out, settings
from betrace.config import Settings
from betrace.errors import BetraceError, RuleError
from betrace.resilience.quarantine import QUARANTINE_FILE, read_quarantine
from betrace.rules.model import LANGUAGES, SEVERITIES, Rule
from betrace.rules.registry import DEFAULT_TOPIC, RegistryState, RuleVersion

app = typer.Typer(
    help=(
        "Manage per-tenant rules. Every change is a new immutable version (author, time, reason) "
        "on the compacted Kafka topic betrace.rules; running workers pick it up within seconds.\n\n"
        "Examples:\n\n"
        "  betrace rules add --file config/rules/acme.yaml\n\n"
        "  betrace rules add --tenant acme --id pii-audit --severity high "
        "--expression 'when { pii.access } always { audit.log }' --reason 'GDPR art. 30'\n\n"
        "  betrace rules list --all\n\n"
        "  betrace rules history acme/pii-audit\n\n"
        "  betrace rules disable acme/pii-audit --reason 'replaced by pii-audit-v2'\n\n"
        "  betrace rules test acme/pii-audit --trace trace.json"
    ),
    no_args_is_help=True,
)


class _Options:
    topic: str | None = None
    timeout_s: float = 15.0


OPTIONS = _Options()
RefArg = Annotated[str, typer.Argument(metavar="TENANT/ID", help="The rule, e.g. acme/pii-audit.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
AuthorOpt = Annotated[
    str | None, typer.Option("--author", help="Who makes the change (default: $BETRACE_AUTHOR or $USER).")
]


@app.callback()
def _options(
    topic: Annotated[
        str | None,
        typer.Option(
            "--topic", help=f"Rules topic (default: the settings' rules topic, else {DEFAULT_TOPIC})."
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=1.0, help="Seconds to wait for the broker.")
    ] = 15.0,
) -> None:
    OPTIONS.topic = topic
    OPTIONS.timeout_s = timeout


@contextmanager
def _errors() -> Iterator[None]:
    """Errors as one escaped message (rule text may contain [brackets]) and exit code 1."""
    try:
        yield
    except BetraceError as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        console.print("interrupted")
        raise typer.Exit(130) from None


def rules_topic(cfg: Settings) -> str:
    """``--topic``, else ``settings.topics.rules`` when the settings have it, else the default."""
    if OPTIONS.topic:
        return OPTIONS.topic
    configured = getattr(cfg.topics, "rules", None)
    return configured if isinstance(configured, str) and configured else DEFAULT_TOPIC


def _author(author: str | None) -> str:
    if author:
        return author
    try:
        return os.environ.get("BETRACE_AUTHOR") or getpass.getuser()
    except (KeyError, OSError):
        return ""


def _read(cfg: Settings) -> RegistryState:
    from betrace.rules.store import read_state

    return asyncio.run(read_state(cfg.brokers, rules_topic(cfg), OPTIONS.timeout_s))


def _commit(cfg: Settings, make: Callable[[RegistryState], Sequence[RuleVersion]]) -> list[RuleVersion]:
    from betrace.rules.store import commit

    return asyncio.run(
        commit(
            cfg.brokers,
            rules_topic(cfg),
            make,
            replication_factor=cfg.topics.replication_factor,
            timeout_s=OPTIONS.timeout_s,
        )
    )


def _doc(version: RuleVersion) -> dict[str, Any]:
    doc = version.to_dict()
    del doc["format"]
    return doc


def _print_json(value: object) -> None:
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


def _line(version: RuleVersion) -> str:
    rule = version.rule
    state = "enabled" if rule.enabled else "disabled"
    expression = " ".join(rule.expression.split())
    return (
        f"{rule.tenant}/{rule.id}@v{rule.version}  {rule.severity:<8} {rule.language:<8} {state:<8} "
        f"{expression}"
    )


def _plain(text: str) -> None:
    out.print(text, highlight=False, markup=False)


# -- offline commands ------------------------------------------------------------------


@app.command()
def validate(
    paths: Annotated[
        list[Path] | None,
        typer.Argument(help="Rule files (default: every file in BETRACE_RULES_DIR)."),
    ] = None,
    expression: Annotated[
        str | None, typer.Option("--expression", "-e", help="Check this one expression instead of files.")
    ] = None,
    language: Annotated[
        str, typer.Option(help=f"Language of --expression: {', '.join(LANGUAGES)}.")
    ] = "betrace",
) -> None:
    """Parse and compile rules without publishing anything.

    Syntax errors show the line, the column and a caret under the spot.

    Examples:

      betrace rules validate config/rules/acme.yaml

      betrace rules validate -e 'when { pii.access } always { audit.log }'
    """
    from betrace.rules.explain import validate as check_expression
    from betrace.rules.loader import load_rules, parse_rule_file

    with _errors():
        if expression is not None:
            check_expression(expression, language)
            _plain(f"valid {language} expression")
            return
        if paths:
            total = sum(len(parse_rule_file(path)) for path in paths)
            _plain(f"{total} rule(s) in {len(paths)} file(s) are valid")
            return
        cfg = settings()
        ruleset = load_rules(cfg.rules_dir)
        _plain(
            f"{len(ruleset.rules)} rule(s) for {len(ruleset.tenants)} tenant(s) in {cfg.rules_dir} are valid"
        )


@app.command("test")
def try_rule(
    trace: Annotated[
        Path, typer.Option("--trace", "-t", help="OTLP/JSON file (an ExportTraceServiceRequest).")
    ],
    ref: Annotated[
        str | None, typer.Argument(metavar="[TENANT/ID]", help="A published rule (latest version).")
    ] = None,
    version: Annotated[
        int | None, typer.Option("--version", min=1, help="Test this version of TENANT/ID.")
    ] = None,
    expression: Annotated[
        str | None, typer.Option("--expression", "-e", help="Test an unpublished expression instead.")
    ] = None,
    language: Annotated[
        str, typer.Option(help=f"Language of --expression: {', '.join(LANGUAGES)}.")
    ] = "betrace",
) -> None:
    """Run one rule on a trace file and explain the verdict of every trace in it.

    Examples:

      betrace rules test acme/pii-audit --trace trace.json

      betrace rules test -e '{ status = error }' --language traceql --trace trace.json
    """
    from betrace.rules.explain import explain
    from betrace.rules.registry import make_rule, parse_ref

    with _errors():
        if (ref is None) == (expression is None):
            msg = "give either TENANT/ID or --expression"
            raise RuleError(msg)
        cfg = settings()
        if ref is not None:
            tenant, rule_id = parse_ref(ref)
            rule = _read(cfg).get(tenant, rule_id, version).rule
        else:
            assert expression is not None
            rule = make_rule(tenant="cli", rule_id="expression", expression=expression, language=language)
        _plain(explain(rule, _read_trace(cfg, trace)))


def _read_trace(cfg: Settings, path: Path) -> Any:
    from betrace.streams.otlp import OtlpDecoder, Record

    try:
        data = path.read_bytes()
    except OSError as exc:
        msg = f"cannot read {path}: {exc.strerror or exc}"
        raise RuleError(msg) from None
    decoder = OtlpDecoder(
        encoding="otlp_json", tenant_header=cfg.tenant_header, default_tenant=cfg.default_tenant
    )
    batch = decoder.decode([Record(value=data)])
    if batch.dead_letters:
        detail = "; ".join(d.detail for d in batch.dead_letters)
        msg = f"{path}: not usable OTLP/JSON: {detail}"
        raise RuleError(msg)
    return batch.spans


# -- registry commands ------------------------------------------------------------------


@app.command()
def add(
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="A tenant YAML file: publish each rule that changed.")
    ] = None,
    tenant: Annotated[str | None, typer.Option(help="Tenant of the rule.")] = None,
    rule_id: Annotated[str | None, typer.Option("--id", help="Rule id, unique per tenant.")] = None,
    expression: Annotated[str | None, typer.Option("--expression", "-e", help="The rule expression.")] = None,
    language: Annotated[str | None, typer.Option(help=f"{', '.join(LANGUAGES)} (default: betrace).")] = None,
    severity: Annotated[str | None, typer.Option(help=f"{', '.join(SEVERITIES)} (default: medium).")] = None,
    name: Annotated[str | None, typer.Option(help="Human-readable name (default: the id).")] = None,
    description: Annotated[str | None, typer.Option(help="Longer description.")] = None,
    reason: Annotated[str | None, typer.Option(help="Why this change is made (required with --id).")] = None,
    author: AuthorOpt = None,
) -> None:
    """Publish a new version of a rule (or of each changed rule of a YAML file).

    The rule must compile: a version that does not is rejected here and never
    reaches the workers. Options left out keep the latest version's values,
    so changing only the severity is '--tenant acme --id x --severity high
    --reason ...'. An unchanged rule publishes nothing. A YAML file's
    'version' fields are ignored: the registry numbers versions.

    Examples:

      betrace rules add --file config/rules/acme.yaml

      betrace rules add --tenant acme --id pii-audit --severity high --reason 'GDPR audit'
      -e 'when { pii.access } always { audit.log }'

      betrace rules add --tenant acme --id pii-audit --severity critical --reason 'raised by SecOps'
    """
    from betrace.rules.loader import parse_rule_file
    from betrace.rules.registry import propose

    with _errors():
        who = _author(author)
        if file is not None:
            if tenant or rule_id or expression:
                msg = "--file cannot be combined with --tenant/--id/--expression"
                raise RuleError(msg)
            rules = parse_rule_file(file)
            why = reason or f"published from {file.name}"

            def make(state: RegistryState) -> list[RuleVersion]:
                found = (propose(state, rule, author=who, reason=why) for rule in rules)
                return [v for v in found if v is not None]

            cfg = settings()
            published = _commit(cfg, make)
            changed = {v.key for v in published}
            for version in published:
                _plain(f"published {version.rule.tenant}/{version.rule.id}@v{version.rule.version}")
            for rule in rules:
                if (rule.tenant, rule.id) not in changed:
                    _plain(f"unchanged {rule.tenant}/{rule.id}")
            return
        if not tenant or not rule_id:
            msg = "give --file, or --tenant and --id (with --expression for a new rule)"
            raise RuleError(msg)
        if not reason:
            msg = "--reason is required: every version records why it was made"
            raise RuleError(msg)
        given = {
            "expression": expression,
            "language": language,
            "severity": severity,
            "name": name,
            "description": description,
        }

        def make_one(state: RegistryState) -> list[RuleVersion]:
            rule = _merged(state, tenant, rule_id, given)
            version = propose(state, rule, author=who, reason=reason)
            return [] if version is None else [version]

        cfg = settings()
        published = _commit(cfg, make_one)
        if published:
            rule = published[0].rule
            _plain(f"published {rule.tenant}/{rule.id}@v{rule.version}")
        else:
            _plain(f"unchanged {tenant}/{rule_id}: nothing published")


def _merged(state: RegistryState, tenant: str, rule_id: str, given: dict[str, str | None]) -> Rule:
    """The rule as given, falling back to the latest version's fields (or defaults)."""
    from betrace.rules.registry import check_names, make_rule

    check_names(tenant, rule_id)
    latest = state.latest(tenant, rule_id)
    if latest is None:
        if not given["expression"]:
            msg = f"{tenant}/{rule_id} is a new rule: --expression is required"
            raise RuleError(msg)
        base = Rule(id=rule_id, tenant=tenant, name="", expression="")
    else:
        base = latest.rule
    rule = make_rule(
        tenant=tenant,
        rule_id=rule_id,
        expression=given["expression"] or base.expression,
        name=given["name"] if given["name"] is not None else base.name,
        severity=given["severity"] or base.severity,
        language=given["language"] or base.language,
        description=given["description"] if given["description"] is not None else base.description,
    )
    # 'add' puts the rule in force, also when its latest version was a disable.
    return replace(rule, enabled=True)


def _set_enabled(ref: str, *, enabled: bool, reason: str, author: str | None) -> None:
    from betrace.rules.registry import parse_ref, set_enabled

    with _errors():
        tenant, rule_id = parse_ref(ref)
        who = _author(author)
        cfg = settings()
        [version] = _commit(
            cfg,
            lambda state: [set_enabled(state, tenant, rule_id, enabled=enabled, author=who, reason=reason)],
        )
        word = "enabled" if enabled else "disabled"
        _plain(f"{word} {tenant}/{rule_id}: v{version.rule.version}")


@app.command()
def disable(
    ref: RefArg,
    reason: Annotated[str, typer.Option("--reason", help="Why the rule stops being evaluated.")],
    author: AuthorOpt = None,
) -> None:
    """Stop evaluating a rule: publishes a new version with enabled=false (history is kept).

    Example: betrace rules disable acme/pii-audit --reason 'false positives, see INC-42'
    """
    _set_enabled(ref, enabled=False, reason=reason, author=author)


@app.command()
def enable(
    ref: RefArg,
    reason: Annotated[str, typer.Option("--reason", help="Why the rule is evaluated again.")],
    author: AuthorOpt = None,
) -> None:
    """Evaluate a disabled rule again (a new version with enabled=true).

    Example: betrace rules enable acme/pii-audit --reason 'INC-42 fixed'
    """
    _set_enabled(ref, enabled=True, reason=reason, author=author)


@app.command("list")
def list_rules(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's rules.")] = None,
    show_all: Annotated[bool, typer.Option("--all", "-a", help="Include disabled rules.")] = False,
    files: Annotated[
        bool, typer.Option("--files", help="List the YAML seed files in BETRACE_RULES_DIR (offline).")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """List the latest version of each rule (enabled ones unless --all).

    Examples: betrace rules list --tenant acme --all;  betrace rules list --json
    """
    with _errors():
        cfg = settings()
        if files:
            versions = _seed_versions(cfg, tenant, include_disabled=show_all)
        else:
            versions = _read(cfg).latest_all(include_disabled=show_all, tenant=tenant)
    # Quarantined rule versions, as the worker sharing this data directory wrote them.
    quarantined = {
        (q.tenant, q.rule_id, q.version): q.reason for q in read_quarantine(cfg.data_dir / QUARANTINE_FILE)
    }
    if as_json:
        docs = [_doc(v) for v in versions]
        for doc, v in zip(docs, versions, strict=True):
            doc["quarantined"] = quarantined.get((v.rule.tenant, v.rule.id, v.rule.version))
        _print_json(docs)
        return
    if not versions:
        _plain("no rules" + (f" for tenant {tenant}" if tenant else ""))
    for version in versions:
        reason = quarantined.get((version.rule.tenant, version.rule.id, version.rule.version))
        _plain(_line(version) + (f"  QUARANTINED: {reason}" if reason else ""))


def _seed_versions(cfg: Settings, tenant: str | None, *, include_disabled: bool) -> list[RuleVersion]:
    """The YAML files' rules shown as unpublished versions (author 'file')."""
    from betrace.rules.loader import load_rules
    from betrace.rules.registry import now_utc

    at = now_utc()
    return [
        RuleVersion(rule, author="file", created_at=at, reason=f"in {cfg.rules_dir}")
        for rule in load_rules(cfg.rules_dir).rules
        if (tenant is None or rule.tenant == tenant) and (include_disabled or rule.enabled)
    ]


@app.command()
def show(
    ref: RefArg,
    version: Annotated[
        int | None, typer.Option("--version", "-v", min=1, help="This version, not the latest.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one version of a rule in full (the latest by default).

    Example: betrace rules show acme/pii-audit --version 2
    """
    from betrace.rules.registry import parse_ref

    with _errors():
        tenant, rule_id = parse_ref(ref)
        cfg = settings()
        found = _read(cfg).get(tenant, rule_id, version)
    if as_json:
        _print_json(_doc(found))
        return
    for key, value in _doc(found).items():
        _plain(f"{key + ':':<12} {value}")


@app.command()
def history(ref: RefArg, as_json: JsonOpt = False) -> None:
    """Every version of a rule, oldest first, with author, time and reason.

    Example: betrace rules history acme/pii-audit
    """
    from betrace.rules.registry import parse_ref

    with _errors():
        tenant, rule_id = parse_ref(ref)
        cfg = settings()
        versions = _read(cfg).history(tenant, rule_id)
        if not versions:
            msg = f"no rule {tenant}/{rule_id}"
            raise RuleError(msg)
    if as_json:
        _print_json([_doc(v) for v in versions])
        return
    for v in versions:
        created = v.created_at.isoformat(timespec="seconds")
        _plain(f"{_line(v)}\n    {created} by {v.author}: {v.reason}")
