"""The ledger backends the contract suite runs against: embedded always, TigerBeetle when installed."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from betrace.sinks.ledger import EmbeddedLedger, Ledger


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module", params=["embedded", "tigerbeetle"])
def ledger(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ledger]:
    """A fresh ledger per module; tests use their own random ledger numbers and ids."""
    tmp: Path = tmp_path_factory.mktemp("ledger")
    if request.param == "embedded":
        embedded = EmbeddedLedger(tmp / "ledger.duckdb")
        yield embedded
        embedded.close()
        return
    binary = os.environ.get("BETRACE_TIGERBEETLE_BIN") or shutil.which("tigerbeetle")
    if not binary:
        pytest.skip(
            "TigerBeetle contract run skipped: no 'tigerbeetle' binary on PATH and BETRACE_TIGERBEETLE_BIN "
            "unset (needs a 0.17.9+ server; no package registry ships it here)"
        )
    from betrace.sinks.ledger.tb_client import open_tigerbeetle

    data = tmp / "0_0.tigerbeetle"
    subprocess.run(
        [binary, "format", "--cluster=0", "--replica=0", "--replica-count=1", "--development", str(data)],
        check=True,
        capture_output=True,
    )
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "start", f"--addresses=127.0.0.1:{port}", "--development", str(data)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        tb = open_tigerbeetle(f"127.0.0.1:{port}", connect_timeout_s=30)
        yield tb
        tb.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def rng() -> random.Random:
    return random.Random()
