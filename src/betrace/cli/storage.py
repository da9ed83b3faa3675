"""``betrace storage stats|cleanup``: bytes, rows and day ranges per tier; TTL and quota removal.

Register with ``app.add_typer(storage_cmd.app, name="storage")``.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Annotated

import orjson
import typer
from rich.table import Table

from betrace.cli.archive import open_archival_ledger, open_store
from betrace.cli.common import fail_clearly, out, settings

app = typer.Typer(
    help=(
        "Hot (DuckDB) and cold (archived Parquet) storage per tenant: figures, and cleanup by TTL "
        "per data type and by per-tenant quota."
    ),
    no_args_is_help=True,
)


@app.command("stats")
def stats(
    tenant: Annotated[str | None, typer.Option("--tenant", "-t", help="Only this tenant.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON line per tenant and tier.")] = False,
) -> None:
    """Per tenant and tier (hot, cold): bytes, span and signal rows, oldest and newest day.

    The worker exports the same figures as the betrace_storage_* metrics.

    Example: betrace storage stats --tenant acme
    """
    from betrace.archive.storage import TierStats, tenant_stats

    cfg = settings()
    with fail_clearly():
        store, tenants = open_store(cfg, tenant)
        figures: list[TierStats] = []
        try:
            for name in tenants:
                figures.extend(tenant_stats(store, name))
        finally:
            store.close()
    if as_json:
        for s in figures:
            doc = {
                k: getattr(s, k) for k in ("tenant", "tier", "bytes", "spans", "signals", "oldest", "newest")
            }
            sys.stdout.write(orjson.dumps(doc, default=str).decode() + "\n")
        return
    if not figures:
        out.print(f"no tenant files in {cfg.data_dir}")
        return
    table = Table("tenant", "tier", "bytes", "spans", "signals", "oldest day", "newest day", "failed days")
    for s in figures:
        table.add_row(
            s.tenant,
            s.tier,
            f"{s.bytes:,}",
            f"{s.spans:,}",
            f"{s.signals:,}",
            str(s.oldest or "-"),
            str(s.newest or "-"),
            str(s.failed) if s.tier == "hot" else "",
        )
    out.print(table)


@app.command("cleanup")
def cleanup(
    tenant: Annotated[str | None, typer.Option("--tenant", "-t", help="Only this tenant.")] = None,
    apply: Annotated[
        bool, typer.Option("--apply", help="Remove what the plan lists (default: dry run, remove nothing).")
    ] = False,
) -> None:
    """Remove archived days from cold storage by TTL and quota. A dry run unless --apply.

    Policies: archived spans older than BETRACE_ARCHIVE__SPANS_TTL_DAYS and signals
    older than BETRACE_ARCHIVE__SIGNALS_TTL_DAYS go; a tenant above
    BETRACE_ARCHIVE__TENANT_QUOTA_BYTES loses its oldest archived days first.
    Hot data is never touched here (only verified archival removes hot rows).

    Examples:
      betrace storage cleanup                 # show what would be removed
      betrace storage cleanup --tenant acme --apply
    """
    from betrace.archive.service import cleanup_cold
    from betrace.sinks.cold import open_cold_storage

    cfg = settings()
    with fail_clearly():
        store, tenants = open_store(cfg, tenant)
        ledger = open_archival_ledger(cfg) if apply else None
        try:
            cold = open_cold_storage(cfg.cold, cfg.data_dir)
            report = asyncio.run(
                cleanup_cold(
                    store,
                    cold,
                    cfg.archive,
                    tenants=tenants,
                    apply=apply,
                    ledger=ledger.archival if ledger else None,
                )
            )
        finally:
            if ledger is not None:
                ledger.close()
            store.close()
    if not report.plan:
        out.print("nothing to remove: every archived day is within its TTL and the quota")
        if apply and report.files_deleted:
            out.print(f"deleted {report.files_deleted} leftover file(s) of earlier removals")
        return
    table = Table("tenant", "day", "kind", "part", "rows", "bytes", "why")
    for item in report.plan:
        u = item.unit
        table.add_row(
            item.tenant, str(u.day), u.kind, str(u.part), f"{u.rows:,}", f"{u.bytes:,}", item.reason
        )
    out.print(table)
    verb = "removed" if apply else "would remove"
    out.print(f"{verb} {len(report.plan)} archived unit(s), {report.bytes:,} bytes")
    if not apply:
        out.print("dry run: nothing was removed; add --apply to remove these")
