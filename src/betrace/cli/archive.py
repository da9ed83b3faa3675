"""``betrace archive run|status``: archive hot days to cold storage by hand, and see what is archived.

Register with ``app.add_typer(archive_cmd.app, name="archive")``.

The worker that owns the tenant files archives them itself every day at
``BETRACE_ARCHIVE__SCHEDULE``. These commands open the tenant files for
writing, so they refuse to run while a worker holds them (DuckDB allows one
process per file) and say so.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import sys
from dataclasses import dataclass
from typing import Annotated, Any

import orjson
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from betrace.archive.layout import TENANT_RE
from betrace.cli.common import console, fail_clearly, out, settings
from betrace.config import Settings
from betrace.errors import BetraceError
from betrace.sinks.duckdb_store import StoreBusyError, TenantStore

logger = logging.getLogger(__name__)

app = typer.Typer(
    help=(
        "Archive hot days (spans, trace summaries, signals) to cold storage as Parquet, verified "
        "before anything is deleted from the hot store. The worker does this daily at "
        "BETRACE_ARCHIVE__SCHEDULE; use these commands when no worker holds the tenant files."
    ),
    no_args_is_help=True,
)


class ArchiveCliError(BetraceError):
    """Bad input or a tenant file another process holds."""


def parse_day(value: str | None) -> dt.date | None:
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        msg = f"--date: expected YYYY-MM-DD, got {value[:40]!r}"
        raise ArchiveCliError(msg) from None


def open_store(cfg: Settings, tenant: str | None) -> tuple[TenantStore, list[str]]:
    """A writable store over the tenant files; a clear error if a worker holds one."""
    store = TenantStore(
        cfg.data_dir, checkpoint_mib=cfg.store_checkpoint_mib, memory_mib=cfg.store_memory_mib
    )
    if tenant is not None:
        if not TENANT_RE.match(tenant):
            msg = f"--tenant: {tenant!r} is not a valid tenant name"
            raise ArchiveCliError(msg)
        if not store.has_tenant(tenant):
            known = ", ".join(store.tenants()) or "none"
            msg = f"tenant {tenant!r} has no data in {cfg.data_dir} (known: {known})"
            raise ArchiveCliError(msg)
    tenants = [tenant] if tenant else store.tenants()
    for name in tenants:
        try:
            store.connection(name)
        except StoreBusyError:
            store.close()
            msg = (
                f"tenant {name!r}: {store.path(name)} is held by a running worker. The worker archives its "
                f"tenants itself every day at {cfg.archive.schedule} UTC (BETRACE_ARCHIVE__SCHEDULE); to "
                "archive now, stop the worker (SIGTERM), run this command, then start the worker again"
            )
            raise ArchiveCliError(msg) from None
    return store, tenants


@dataclass
class _Ledger:
    archival: Any
    close: Any


def open_archival_ledger(cfg: Settings) -> _Ledger | None:
    """The ledgers for archival events (each tenant's own, or TigerBeetle), or None with a warning."""
    from betrace.metrics import InMemoryHooks
    from betrace.sinks.ledger import TenantLedgers, open_ledger
    from betrace.sinks.ledger.tenants import TenantArchivalLedger

    shared = None
    if cfg.tigerbeetle_addresses:
        try:
            shared = open_ledger(
                cfg.data_dir, cfg.tigerbeetle_addresses, cluster_id=cfg.tigerbeetle_cluster_id
            )
        except BetraceError as exc:
            console.print(
                f"[yellow]warning:[/] ledger unavailable, archival events are recorded next run: {exc}"
            )
            return None
    # Embedded tenant ledgers open lazily; one that cannot be opened leaves its events for the next run.
    ledgers = TenantLedgers(cfg.data_dir, hooks=InMemoryHooks(), shared=shared, open_timeout_s=5.0)
    return _Ledger(TenantArchivalLedger(ledgers), lambda: asyncio.run(ledgers.close()))


@app.command("run")
def run(
    tenant: Annotated[
        str | None, typer.Option("--tenant", "-t", help="Only this tenant (default: all).")
    ] = None,
    date: Annotated[
        str | None,
        typer.Option("--date", "-d", help="Only this UTC day, YYYY-MM-DD (default: every due day)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON lines.")] = False,
) -> None:
    """Archive due days now: export to Parquet, upload, verify, then delete from the hot store.

    A day is due when it is older than BETRACE_ARCHIVE__HOT_DAYS whole days;
    --date archives one given day (any day before today). Re-running is always
    safe: interrupted days resume where they stopped, finished days are skipped.
    Exit code 1 when a day failed (it stays hot and is retried on the next run).

    Examples:
      betrace archive run
      betrace archive run --tenant acme --date 2026-11-20
    """
    from betrace.archive.job import ArchiveJob, UnitReport
    from betrace.audit.store import recorder_for
    from betrace.sinks.cold import open_cold_storage

    cfg = settings()
    failed = False
    with fail_clearly():
        day = parse_day(date)
        store, tenants = open_store(cfg, tenant)
        ledger = open_archival_ledger(cfg)
        audit = recorder_for(cfg)
        try:
            cold = open_cold_storage(cfg.cold, cfg.data_dir)
            job = ArchiveJob(
                store, cold, cfg.archive, audit=audit, ledger=ledger.archival if ledger else None
            )
            progress = Progress(
                TextColumn("archiving"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                console=console,
                disable=as_json or not console.is_terminal,
            )
            task = progress.add_task("", total=None)

            def planned(n: int) -> None:
                progress.update(task, total=n)

            def done(u: UnitReport) -> None:
                progress.update(task, advance=1, description=f"{u.tenant} {u.day} {u.kind}: {u.state}")
                if as_json:
                    doc = {**u.__dict__, "day": u.day.isoformat()}
                    sys.stdout.write(orjson.dumps(doc, default=str).decode() + "\n")

            with progress:
                report = asyncio.run(job.run(tenants, day, on_plan=planned, on_unit=done))
        finally:
            if ledger is not None:
                ledger.close()
            audit.close()
            store.close()
    failed = bool(report.failed)
    if not as_json:
        if not report.units:
            out.print("nothing to archive: no due day has hot data")
        else:
            table = Table("tenant", "day", "kind", "part", "state", "rows", "bytes", "seconds", "note")
            for u in report.units:
                note = u.reason or (f"resumed after {u.resumed_from}" if u.resumed_from != "pending" else "")
                style = "red" if u.state == "failed" else None
                table.add_row(
                    u.tenant,
                    str(u.day),
                    u.kind,
                    str(u.part),
                    u.state,
                    f"{u.rows:,}",
                    f"{u.bytes:,}",
                    f"{u.seconds:.2f}",
                    note,
                    style=style,
                )
            out.print(table)
            out.print(
                f"{len(report.units) - len(report.failed)} archived, {len(report.failed)} failed, "
                f"{report.rows:,} rows moved to {cold!r}"
            )
        for name, waiting in report.postponed.items():
            console.print(f"{name}: {waiting} more day(s) wait for the next run (cold storage failing)")
    if failed:
        raise typer.Exit(1)


@app.command("status")
def status(
    tenant: Annotated[str | None, typer.Option("--tenant", "-t", help="Only this tenant.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON line per unit.")] = False,
) -> None:
    """Per tenant and day: archive state, rows, bytes, attempts and the last failure.

    States: pending, exported, uploaded, verified (in progress; the data is still
    hot), cleaned (in cold storage only), purged (removed by TTL or quota),
    failed (stays hot; the next run resumes it).

    Example: betrace archive status --tenant acme
    """
    from betrace.archive import state

    cfg = settings()
    with fail_clearly():
        store, tenants = open_store(cfg, tenant)
        rows: list[tuple[str, state.Unit]] = []
        try:
            for name in tenants:
                with store.cursor(name) as con:
                    rows.extend((name, u) for u in state.units(con))
        finally:
            store.close()
    if as_json:
        for name, u in rows:
            doc = {"tenant": name, **{k: getattr(u, k) for k in state.COLUMNS}}
            sys.stdout.write(orjson.dumps(doc, default=str).decode() + "\n")
        return
    if not rows:
        out.print("nothing archived yet")
        return
    table = Table("tenant", "day", "kind", "part", "state", "rows", "bytes", "attempts", "reason")
    for name, u in rows:
        shown = u.state if u.state != "failed" else f"failed (after {u.last_good})"
        table.add_row(
            name,
            str(u.day),
            u.kind,
            str(u.part),
            shown,
            f"{u.rows:,}",
            f"{u.bytes:,}",
            str(u.attempts),
            u.reason or "",
            style="red" if u.state == "failed" else None,
        )
    out.print(table)
