"""``betrace audit``: read the audit trail (``<data_dir>/audit.duckdb``) and backfill legacy rows.

There is no update or delete command: the trail is append-only. The CLI is
the operator's view and shows every event, system events (no tenant)
included; the HTTP API shows a tenant's key only that tenant's events.
"""

from __future__ import annotations

import re
import sys
import time
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.tree import Tree

from betrace.cli.common import console, fail_clearly, out, settings
from betrace.errors import BetraceError

app = typer.Typer(
    help=(
        "The audit trail: append-only events with causal parents (worker starts and stops, rule "
        "versions, evaluation batches, emitted signals, breaker changes, archival phases, ingestion "
        "runs). Every event has an id; 'chain' follows parents up and children down.\n\n"
        "Examples:\n\n"
        "  betrace audit list --since 1h\n\n"
        "  betrace audit list --type signal.emitted --tenant acme --limit 20 --json\n\n"
        "  betrace audit show 3f2a...   (the event and its children)\n\n"
        "  betrace audit chain 3f2a...  (ancestors and descendants as a tree)\n\n"
        "  betrace audit backfill       (fill parent_event_date on legacy rows; resumable)"
    ),
    no_args_is_help=True,
)


class AuditCliError(BetraceError):
    """Bad input to an audit command."""


_RELATIVE_RE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_when(name: str, value: str | None) -> int | None:
    """RFC 3339, integer ns, or a duration ago (``90s``, ``15m``, ``2h``, ``7d``) -> ns."""
    if not value:
        return None
    match = _RELATIVE_RE.match(value.strip())
    if match:
        return time.time_ns() - int(float(match[1]) * _UNIT_S[match[2]] * 1e9)
    from betrace.api.http import BadRequestError, parse_time

    try:
        return parse_time(name, value)
    except BadRequestError as exc:
        msg = f"{exc} (or a duration ago such as 15m, 2h, 7d)"
        raise AuditCliError(msg) from None


def _line(doc: dict[str, Any]) -> str:
    tenant = doc["tenant"] or "-"
    return (
        f"[bold]{escape(doc['event_type'])}[/] {escape(doc['event_id'])} "
        f"[dim]{doc['occurred_at']} tenant={escape(tenant)} actor={escape(doc['actor'])} "
        f"outcome={escape(doc['outcome'])}[/] {escape(doc['subject'])}"
    )


def _print_json(doc: Any) -> None:
    sys.stdout.write(orjson.dumps(doc).decode() + "\n")


@app.command("list")
def list_events(
    event_type: Annotated[
        list[str] | None, typer.Option("--type", "-t", help="Only this type (repeat for several).")
    ] = None,
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's events.")] = None,
    system: Annotated[bool, typer.Option("--system", help="Only system events (no tenant).")] = False,
    actor: Annotated[str | None, typer.Option(help="Only events by this actor.")] = None,
    subject: Annotated[str | None, typer.Option(help="Only events about this subject (exact).")] = None,
    outcome: Annotated[str | None, typer.Option(help="Only this outcome (ok, error, ...).")] = None,
    since: Annotated[
        str | None, typer.Option(help="Happened at or after: RFC 3339, ns, or a duration ago (2h).")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Happened before (same forms as --since).")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="Events per page.")] = 50,
    cursor: Annotated[str | None, typer.Option(help="Continue after a page ('next cursor').")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document per line.")] = False,
) -> None:
    """List events oldest first in commit order; page on with --cursor."""
    from betrace.api import cursor as cursors
    from betrace.audit.events import AuditEventType
    from betrace.audit.store import AuditStore, EventFilter

    cfg = settings()
    with fail_clearly():
        known = {t.value for t in AuditEventType}
        bad = sorted(set(event_type or ()) - known)
        if bad:
            msg = f"--type: unknown {', '.join(bad)}; expected any of {', '.join(sorted(known))}"
            raise AuditCliError(msg)
        if system and tenant:
            msg = "give --tenant or --system, not both"
            raise AuditCliError(msg)
        flt = EventFilter(
            event_types=tuple(event_type or ()),
            tenant=tenant,
            actor=actor,
            subject=subject,
            outcome=outcome,
            since=parse_when("--since", since),
            until=parse_when("--until", until),
            system_only=system,
        )
        filters = {"path": "audit.events", **flt.as_dict()}
        # Relative --since moves with the clock: fingerprint the cursor on the other filters only.
        filters["since"] = since
        filters["until"] = until
        after = cursors.decode(cursor, filters) if cursor else None
        page = AuditStore.from_settings(cfg).list_events(flt, limit=limit, after=after)
    next_cursor = cursors.encode(page.next_key, filters) if page.next_key else None
    if as_json:
        for doc in page.items:
            _print_json(doc)
        if next_cursor:
            console.print(f"next cursor: {next_cursor}")
        return
    if not page.items:
        out.print("no audit events match")
        return
    for doc in page.items:
        out.print(_line(doc), highlight=False)
    if next_cursor:
        out.print(f"\nmore: betrace audit list ... --cursor {next_cursor}", highlight=False)


@app.command("show")
def show(
    event_id: Annotated[str, typer.Argument(help="The event id.")],
    children: Annotated[int, typer.Option(min=0, max=10_000, help="Children to list.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show one event with its payload and its direct children (found through the parent index)."""
    from betrace.audit.store import AuditStore

    cfg = settings()
    with fail_clearly():
        store = AuditStore.from_settings(cfg)
        doc = store.get(event_id)
        if doc is None:
            msg = f"no audit event {event_id} in {store.path}"
            raise AuditCliError(msg)
        kids = store.children(event_id, limit=max(children, 1))
    shown = kids.items[:children]
    if as_json:
        _print_json({"event": doc, "children": shown, "more_children": kids.next_key is not None})
        return
    table = Table(show_header=False, box=None)
    for name in ("event_id", "event_type", "event_date", "occurred_at", "recorded_at", "tenant", "actor"):
        table.add_row(name, escape(str(doc[name])))
    table.add_row("subject", escape(doc["subject"]))
    table.add_row("outcome", escape(doc["outcome"]))
    parent = f"{doc['parent_event_id']} ({doc['parent_event_date']})" if doc["parent_event_id"] else "-"
    table.add_row("parent", escape(parent))
    table.add_row("payload", escape(orjson.dumps(doc["payload"], option=orjson.OPT_INDENT_2).decode()))
    out.print(table)
    if shown:
        out.print(f"\nchildren ({len(shown)}{'+' if kids.next_key else ''}):")
        for kid in shown:
            out.print("  " + _line(kid), highlight=False)


@app.command("chain")
def chain(
    event_id: Annotated[str, typer.Argument(help="The event id.")],
    max_depth: Annotated[
        int | None,
        typer.Option(min=1, max=1000, help="Levels up and down (default BETRACE_AUDIT__CHAIN_MAX_DEPTH)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Show an event's causal chain: its ancestors up to the root, and its descendants as a tree."""
    from betrace.audit.store import AuditStore

    cfg = settings()
    depth = max_depth or cfg.audit.chain_max_depth
    with fail_clearly():
        store = AuditStore.from_settings(cfg)
        found = store.chain(event_id, max_depth=depth, max_events=cfg.audit.chain_max_events)
        if found is None:
            msg = f"no audit event {event_id} in {store.path}"
            raise AuditCliError(msg)
    if as_json:
        _print_json(
            {
                "event": found.event,
                "ancestors": found.ancestors,
                "descendants": found.descendants,
                "truncated": found.truncated,
            }
        )
        return
    path = [*reversed(found.ancestors), found.event]
    root = Tree(_line(path[0]), highlight=False)
    node = root
    for doc in path[1:]:
        node = node.add(_line(doc), highlight=False)
    node.label = f"[reverse]{node.label}[/]" if isinstance(node.label, str) else node.label
    nodes = {found.event["event_id"]: node}
    for doc in found.descendants:
        holder = nodes.get(doc["parent_event_id"], node)
        nodes[doc["event_id"]] = holder.add(_line(doc), highlight=False)
    out.print(root)
    if found.truncated:
        out.print(f"[yellow]truncated at depth {depth} or {cfg.audit.chain_max_events} events[/]")


@app.command("backfill")
def backfill_cmd(
    batch_size: Annotated[int, typer.Option(min=1, max=1_000_000, help="Rows per committed batch.")] = 10_000,
    pause: Annotated[
        float, typer.Option(min=0.0, max=60.0, help="Seconds between batches, to leave the file to workers.")
    ] = 0.0,
) -> None:
    """Fill parent_event_date on legacy rows from their parents, in committed batches.

    Rows written before parent_event_date existed name their parent by id
    only. Each batch is one short transaction: workers keep writing, and an
    interrupted run (Ctrl-C, kill) simply continues when run again. Logs
    progress every 10,000 rows, then validates every parent reference and
    exits 1 if any row could not be filled (its parent does not exist).

    Example: betrace audit backfill --batch-size 5000 --pause 0.1
    """
    from betrace.audit.backfill import backfill, legacy_count, validate
    from betrace.audit.store import audit_path

    cfg = settings()
    path = audit_path(cfg)
    timeout = cfg.audit.lock_timeout_s
    with fail_clearly():
        total = legacy_count(path, timeout_s=timeout)
        if total == 0:
            console.print("no legacy rows: nothing to fill")
        else:
            console.print(f"{total:,} legacy row(s) without parent_event_date in {path}")
            with Progress(
                TextColumn("backfilling"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=console,
            ) as progress:
                task = progress.add_task("backfill", total=total)
                result = backfill(
                    path,
                    batch_size=batch_size,
                    pause_s=pause,
                    timeout_s=timeout,
                    on_progress=lambda _done, n: progress.advance(task, n),
                )
            console.print(
                f"filled {result.filled:,} row(s) in {result.batches} batch(es), {result.seconds:.1f} s"
            )
        report = validate(path, timeout_s=timeout)
    console.print(
        f"validated {report.rows:,} event(s): legacy rows left {report.legacy_remaining:,} "
        f"(parent missing {report.dangling:,}, referenced by dated children {report.blocked:,}), "
        f"foreign-key violations {report.fk_violations:,}"
    )
    for sample in report.samples:
        console.print(f"  dangling: {escape(sample)}", highlight=False)
    if not report.ok:
        console.print(
            "[bold red]error:[/] some parent references cannot be completed; the rows above keep "
            "parent_event_date NULL (they stay readable, the foreign key does not cover them)"
        )
        raise typer.Exit(1)
    console.print(f"ok: every parent reference is complete ({datetime.now(UTC):%Y-%m-%d %H:%M:%S}Z)")
