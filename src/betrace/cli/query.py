"""``betrace signals count``: per-rule signal counters, read from the ledger.

Register with ``signals_app.command("count")(query_cmd.signals_count)``.

With TigerBeetle (``BETRACE_TIGERBEETLE_ADDRESSES``) the counters are read
from the cluster directly. The embedded ledger is a DuckDB file that a running
worker holds exclusively; then pass ``--url`` (the worker's query API) and
``--api-key``, or stop the worker.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Annotated, Any

import orjson
import typer

from betrace.cli.common import fail_clearly, out, settings
from betrace.errors import BetraceError


class QueryError(BetraceError):
    """The counters could not be read (bad URL, bad key, unreachable server)."""

    retriable = True


def _from_api(url: str, api_key: str, rule: str, tenant: str | None) -> dict[str, Any]:
    import aiohttp

    async def fetch() -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {api_key}"}
        if tenant:
            headers["X-Scope-OrgID"] = tenant
        timeout = aiohttp.ClientTimeout(total=15)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(
                    f"{url.rstrip('/')}/v1/signals/count", params={"rule": rule}, headers=headers
                ) as resp,
            ):
                body = await resp.read()
                if resp.status != 200:
                    msg = f"{url} answered {resp.status}: {body.decode(errors='replace')[:300]}"
                    raise QueryError(msg)
                doc: dict[str, Any] = orjson.loads(body)
                return doc
        except aiohttp.ClientError as exc:
            msg = f"cannot reach the query API at {url}: {exc}"
            raise QueryError(msg) from None

    return asyncio.run(fetch())


def _from_ledger(rule: str, tenant: str) -> dict[str, Any]:
    from betrace.metrics import InMemoryHooks
    from betrace.sinks.ledger import SignalLedger, open_ledger, tenant_ledger_path

    cfg = settings()
    addresses, cluster = cfg.tigerbeetle_addresses, cfg.tigerbeetle_cluster_id
    path = tenant_ledger_path(cfg.data_dir, tenant)
    if not addresses and not path.exists() and path.parent.is_dir():
        counts = []  # embedded ledgers exist, one per tenant, but this tenant never had a signal
    else:
        ledger = SignalLedger(
            open_ledger(cfg.data_dir, addresses, cluster_id=cluster, read_only=True, tenant=tenant),
            hooks=InMemoryHooks(),
        )
        try:
            counts = ledger.counts(tenant, rule)
        finally:
            ledger.shutdown()
    return {
        "rule": rule,
        "tenant": tenant,
        "versions": [{"version": c.version, "signals": c.signals} for c in counts],
        "total": sum(c.signals for c in counts),
    }


def signals_count(
    rule: Annotated[str, typer.Option("--rule", "-r", help="Rule id.")],
    tenant: Annotated[
        str | None, typer.Option("--tenant", "-t", help="Tenant (default: BETRACE_DEFAULT_TENANT).")
    ] = None,
    url: Annotated[
        str | None, typer.Option("--url", help="Ask a running query API instead, e.g. http://127.0.0.1:6067.")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option("--api-key", envvar="BETRACE_API_KEY", help="API key for --url.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """How many signals a rule has raised, per rule version, from the ledger's counters.

    Replays never change these numbers: each signal is one ledger transfer with a
    deterministic id.
    """
    with fail_clearly():
        if url:
            if not api_key:
                msg = "--url needs --api-key (or BETRACE_API_KEY)"
                raise QueryError(msg)
            doc = _from_api(url, api_key, rule, tenant)
        else:
            doc = _from_ledger(rule, tenant or settings().default_tenant)
    if as_json:
        sys.stdout.write(orjson.dumps(doc).decode() + "\n")
        return
    who = f"{doc.get('tenant')}/" if doc.get("tenant") else ""
    if not doc["versions"]:
        out.print(f"{who}{rule}: no signals recorded")
        return
    for v in doc["versions"]:
        out.print(f"{who}{rule}@v{v['version']}: {v['signals']:,} signals", highlight=False)
    out.print(f"{who}{rule}: {doc['total']:,} signals in total", highlight=False)
