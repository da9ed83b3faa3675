"""``betrace serve`` (the query API from a separate process) and ``betrace apikeys``.

Register with ``app.command("serve")(serve_cmd.serve)`` and
``app.add_typer(serve_cmd.apikeys_app, name="apikeys")``.

``betrace serve`` reads tenant files read-only, one open per request, so it
never blocks a worker from starting; while a worker owns a tenant's file,
requests for that tenant answer 503 with ``Retry-After`` (DuckDB refuses
read-only opens from other processes meanwhile). For live data, use the API
the worker serves itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path
from typing import Annotated

import typer

from betrace.cli.common import fail_clearly, out, settings

apikeys_app = typer.Typer(help="Manage per-tenant API keys of the query API.", no_args_is_help=True)


def _keys_path(override: Path | None) -> Path:
    if override is not None:
        return override
    from betrace.api.keys import KEYS_FILE

    cfg = settings()
    configured = getattr(cfg, "api_keys_file", None)
    return Path(configured) if configured else cfg.data_dir / KEYS_FILE


KeysFile = Annotated[
    Path | None, typer.Option("--keys-file", help="API key file (default: <data_dir>/apikeys.json).")
]


@apikeys_app.command("create")
def apikeys_create(
    tenant: Annotated[str, typer.Option("--tenant", "-t", help="Tenant the key may read.")],
    name: Annotated[str, typer.Option("--name", help="A label, e.g. who uses the key.")] = "",
    keys_file: KeysFile = None,
) -> None:
    """Create a key; it is printed once and only its salted hash is stored."""
    from betrace.api.keys import ApiKeyStore

    with fail_clearly():
        key, token = ApiKeyStore(_keys_path(keys_file)).create(tenant, name)
    out.print(f"created key {key.key_id} for tenant {tenant}; store it now, it is not shown again:")
    typer.echo(token)


@apikeys_app.command("list")
def apikeys_list(
    tenant: Annotated[str | None, typer.Option("--tenant", "-t", help="Only this tenant's keys.")] = None,
    keys_file: KeysFile = None,
) -> None:
    """List keys (ids, tenants, state); secrets are never shown."""
    from betrace.api.keys import ApiKeyStore

    with fail_clearly():
        keys = ApiKeyStore(_keys_path(keys_file)).list(tenant)
    if not keys:
        out.print("no API keys")
    for k in keys:
        state = f"revoked {k.revoked_at}" if k.revoked_at else "active"
        out.print(f"{k.key_id}  {k.tenant}  {state}  created {k.created_at}  {k.name}", highlight=False)


@apikeys_app.command("revoke")
def apikeys_revoke(
    key_id: Annotated[str, typer.Argument(help="Key id (the part after btk_).")],
    tenant: Annotated[str, typer.Option("--tenant", "-t", help="Tenant the key belongs to.")],
    keys_file: KeysFile = None,
) -> None:
    """Revoke a key; requests with it get 401 from then on."""
    from betrace.api.keys import ApiKeyStore

    with fail_clearly():
        done = ApiKeyStore(_keys_path(keys_file)).revoke(key_id, tenant)
    if not done:
        out.print(f"no active key {key_id} for tenant {tenant}")
        raise typer.Exit(1)
    out.print(f"revoked {key_id}")


def serve(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to bind (0: any free port).")] = 6067,
    keys_file: KeysFile = None,
) -> None:
    """Serve the query API (traces, signals, counters) over the tenant files, read-only."""
    from betrace.api.http import ReadOnlyStore, start_api_server
    from betrace.api.keys import ApiKeyStore
    from betrace.archive.coldread import ColdCatalog
    from betrace.sinks.cold import open_cold_storage

    cfg = settings()
    keys = ApiKeyStore(_keys_path(keys_file))

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        cold = ColdCatalog(open_cold_storage(cfg.cold, cfg.data_dir))  # archived days, read with hot ones
        server = await start_api_server(ReadOnlyStore(cfg.data_dir), keys, host=host, port=port, cold=cold)
        out.print(f"query API on {server.url} (OpenAPI: {server.url}/v1/openapi.json); Ctrl-C to stop")
        try:
            await stop.wait()
        finally:
            await server.stop()

    with fail_clearly():
        asyncio.run(run())
