"""``betrace receive``: the OTLP/HTTP receiver as its own process.

Register with ``app.command("receive")(receive_cmd.receive)``.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from betrace.cli.common import fail_clearly, out, settings


def receive(
    port: Annotated[
        int | None,
        typer.Option("--port", "-p", help="Port to listen on (default BETRACE_RECEIVER__PORT, 4318)."),
    ] = None,
    bind: Annotated[
        str | None,
        typer.Option("--bind", help="Address to bind (default BETRACE_RECEIVER__BIND, 127.0.0.1)."),
    ] = None,
) -> None:
    """Accept OTLP/HTTP trace exports on POST /v1/traces and write them to the input topic.

    The same endpoint is served by every worker on its web port
    (BETRACE_WEB_PORT) unless BETRACE_RECEIVER__ENABLED=false; run this to
    scale receiving apart from processing. Bodies may be protobuf
    (application/x-protobuf) or JSON (application/json), optionally gzip.
    The tenant comes from the X-Scope-OrgID header (BETRACE_TENANT_HEADER).

    Under backpressure (the send queue above 90% full, or the ingest group's
    lag on the input topic over BETRACE_RECEIVER__MAX_INPUT_LAG) requests get
    503 with Retry-After; OTLP exporters retry those on their own.

    Examples:

      betrace receive --port 4318

      curl -X POST -H 'Content-Type: application/json' -H 'X-Scope-OrgID: acme' \\
        --data @traces.json http://127.0.0.1:4318/v1/traces
    """
    from aiohttp import web

    from betrace.receiver import Receiver, build_app
    from betrace.streams.admin import ensure_topics

    cfg = settings()
    host = bind or cfg.receiver.bind
    listen = port if port is not None else cfg.receiver.port
    if not 0 < listen < 65536:
        with fail_clearly():
            from betrace.errors import ConfigError

            msg = f"--port must be between 1 and 65535, got {listen}"
            raise ConfigError(msg)
    with fail_clearly():
        asyncio.run(ensure_topics(cfg))  # an unreachable broker fails here, not on the first request
    out.print(f"OTLP/HTTP receiver on http://{host}:{listen}/v1/traces → topic {cfg.topics.input}")
    try:
        web.run_app(build_app(Receiver(cfg)), host=host, port=listen, print=None, handle_signals=True)
    except OSError as exc:
        out.print(f"[bold red]error:[/] cannot listen on {host}:{listen}: {exc}")
        raise typer.Exit(1) from None
