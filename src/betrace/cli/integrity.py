"""``betrace integrity``: check stored traces for structural anomalies, list anomalies."""

from __future__ import annotations

import re
import sys
import time
from typing import Annotated

import orjson
import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from betrace.api.http import ReadOnlyStore, parse_time
from betrace.api.queries import Page
from betrace.cli.common import console, fail_clearly, out, settings
from betrace.errors import BetraceError
from betrace.integrity.checks import KINDS
from betrace.integrity.sink import report
from betrace.integrity.store import STATES, CheckOutcome, check_stored, list_anomalies
from betrace.metrics import InMemoryHooks
from betrace.sinks.duckdb_store import StoreBusyError, TenantStore

app = typer.Typer(
    help=(
        "Structural integrity of stored traces. Workers check every trace when it closes and "
        "recheck recent traces every BETRACE_INTEGRITY__RECHECK_INTERVAL_S; these commands do the "
        "same on demand. Kinds: " + ", ".join(KINDS) + ".\n\n"
        "A tenant file is writable by one process at a time: run 'check' while no worker holds "
        "the tenant (or rely on the worker's recheck and read anomalies through its API, "
        "GET /v1/anomalies).\n\n"
        "Examples:\n\n"
        "  betrace integrity check --tenant acme --since 1h\n\n"
        "  betrace integrity anomalies --tenant acme --kind orphan_span --state open"
    ),
    no_args_is_help=True,
)

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class IntegrityInputError(BetraceError):
    """A bad option value of an integrity command."""


def parse_since(value: str | None) -> int | None:
    """``30m``/``2h``/``7d`` ago, an RFC 3339 timestamp or epoch nanoseconds → ns."""
    if not value:
        return None
    match = _DURATION.match(value.strip())
    if match:
        return time.time_ns() - int(float(match[1]) * _UNIT_S[match[2]] * 1e9)
    try:
        return parse_time("--since", value)
    except BetraceError as exc:
        msg = f"{exc}; or a duration such as 30m, 2h, 7d"
        raise IntegrityInputError(msg) from None


def _tenants(store: TenantStore, tenant: str | None) -> list[str]:
    known = store.tenants()
    if tenant is None:
        return known
    if tenant not in known:
        msg = f"no data for tenant {tenant!r} in {store.data_dir} (known: {', '.join(known) or 'none'})"
        raise IntegrityInputError(msg)
    return [tenant]


@app.command("check")
def check(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant (default: every tenant).")] = None,
    since: Annotated[
        str | None,
        typer.Option(help="Only traces that ended since: 30m, 2h, 7d, an RFC 3339 time or epoch ns."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON line per tenant.")] = False,
) -> None:
    """Check stored spans: flag anomalies, resolve the ones later data fixed. Safe to repeat.

    Exits 0 whether or not anomalies are found (they are data, not errors); see
    'betrace integrity anomalies' for the rows.
    """
    cfg = settings()
    skew_ns = int(cfg.integrity.clock_skew_ms * 1_000_000)
    outcomes: list[CheckOutcome] = []
    with fail_clearly():
        since_ns = parse_since(since)
        # A worker holding a tenant file will not let go: do not wait long for it.
        store = TenantStore(
            cfg.data_dir,
            open_timeout_s=3.0,
            checkpoint_mib=cfg.store_checkpoint_mib,
            memory_mib=cfg.store_memory_mib,
        )
        try:
            tenants = _tenants(store, tenant)
            with Progress(
                TextColumn("checking {task.fields[tenant]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            ) as progress:
                task = progress.add_task("check", total=len(tenants), tenant="")
                for name in tenants:
                    progress.update(task, tenant=name)
                    try:
                        with store.cursor(name) as con:
                            outcomes.append(check_stored(con, name, since_ns=since_ns, skew_ns=skew_ns))
                    except StoreBusyError as exc:
                        msg = (
                            f"{exc}. A running worker rechecks its tenants itself every "
                            f"{cfg.integrity.recheck_interval_s:g} s "
                            "(BETRACE_INTEGRITY__RECHECK_INTERVAL_S); "
                            "read the result with GET /v1/anomalies, or stop the worker and run this again"
                        )
                        raise IntegrityInputError(msg) from None
                    report(InMemoryHooks(), outcomes[-1], "check")
                    progress.advance(task)
        finally:
            store.close()
    for o in outcomes:
        if as_json:
            doc = {
                "tenant": o.tenant,
                "traces": o.traces,
                "found": o.found,
                "opened": o.opened,
                "resolved": o.resolved,
            }
            sys.stdout.write(orjson.dumps(doc).decode() + "\n")
            continue
        found = ", ".join(f"{k} {n:,}" for k, n in sorted(o.found.items())) or "none"
        out.print(
            f"{o.tenant}: {o.traces:,} traces checked; anomalies found: {found}; "
            f"newly opened {sum(o.opened.values()):,}, resolved {sum(o.resolved.values()):,}",
            highlight=False,
        )


@app.command("anomalies")
def anomalies(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant (default: every tenant).")] = None,
    kind: Annotated[str | None, typer.Option(help=f"Only this kind: {', '.join(KINDS)}.")] = None,
    state: Annotated[str | None, typer.Option(help="open or resolved.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="At most this many per tenant.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document per line.")] = False,
) -> None:
    """List anomalies, oldest first. Reads the tenant files (a running worker holds them: use its API)."""
    cfg = settings()
    with fail_clearly():
        if kind is not None and kind not in KINDS:
            msg = f"--kind must be one of {', '.join(KINDS)}, got {kind!r}"
            raise IntegrityInputError(msg)
        if state is not None and state not in STATES:
            msg = f"--state must be open or resolved, got {state!r}"
            raise IntegrityInputError(msg)
        reader = ReadOnlyStore(cfg.data_dir)
        known = TenantStore(cfg.data_dir, read_only=True)
        tenants = _tenants(known, tenant)
        known.close()
        rows = []
        for name in tenants:
            with reader.cursor(name) as con:
                for item in list_anomalies(con, kind=kind, state=state, page=Page(limit=limit)).items:
                    rows.append({"tenant": name, **item})
    if as_json:
        for row in rows:
            sys.stdout.write(orjson.dumps(row).decode() + "\n")
        return
    if not rows:
        out.print("no anomalies")
        return
    table = Table(title="integrity anomalies", title_justify="left")
    table.add_column("kind", no_wrap=True)
    for column in ("tenant", "state", "trace id", "span id", "detected", "details"):
        table.add_column(column, overflow="fold")  # ids are copied from here: never cut them
    for r in rows:
        table.add_row(
            r["kind"],
            r["tenant"],
            r["state"],
            r["trace_id"],
            r["span_id"] or "-",
            r["detected_at"],
            escape(orjson.dumps(r["details"]).decode()),
        )
    out.print(table)
