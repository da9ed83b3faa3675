"""Short-lived DuckDB opens of a file several processes share (audit trail, ingestion runs).

DuckDB lets one process hold a file at a time. Files that workers *and* CLI
commands write (``audit.duckdb``, ``runs.duckdb``) are therefore never held:
each write or read opens the file, does its work and closes it, and an open
that meets another process's lock is retried with jittered backoff until
``timeout_s`` passes, then fails with a retriable :class:`StoreBusyError`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb

from betrace.errors import SinkError
from betrace.sinks.duckdb_store import StoreBusyError


def _is_lock_conflict(exc: duckdb.Error) -> bool:
    text = str(exc).lower()
    return "lock" in text or "conflicting" in text


@contextmanager
def open_shared(
    path: Path, *, read_only: bool = False, timeout_s: float = 10.0
) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open ``path`` for one unit of work, waiting out other processes' short holds."""
    if read_only and not path.exists():
        msg = f"{path} does not exist yet"
        raise SinkError(msg)
    if not read_only:
        path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while True:
        try:
            con = duckdb.connect(str(path), read_only=read_only)
            break
        except duckdb.Error as exc:
            if not _is_lock_conflict(exc):
                msg = f"cannot open {path}: {exc}"
                raise SinkError(msg) from exc
            if time.monotonic() >= deadline:
                msg = f"{path} stayed locked by another process for {timeout_s:.0f} s; retry later"
                raise StoreBusyError(msg) from None
            time.sleep(delay * (0.5 + random.random()))  # noqa: S311 - jitter, not crypto
            delay = min(delay * 2, 0.2)
    try:
        yield con
    finally:
        con.close()
