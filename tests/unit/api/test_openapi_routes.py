"""The OpenAPI document lists exactly the routes the query API serves."""

from __future__ import annotations

from pathlib import Path

from betrace.api.http import ReadOnlyStore, build_app
from betrace.api.keys import ApiKeyStore
from betrace.api.openapi import OPENAPI


def test_every_served_route_is_documented_and_nothing_else(tmp_path: Path) -> None:
    app = build_app(ReadOnlyStore(tmp_path), ApiKeyStore(tmp_path / "keys.json"))
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    documented = {(method, path) for path, ops in OPENAPI["paths"].items() for method in ops}
    assert served == documented
