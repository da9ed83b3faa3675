"""Short-lived DuckDB opens of a file several processes share (audit trail, ingestion runs).

DuckDB lets one process hold a file at a time. Files that workers *and* CLI
commands write (``audit.duckdb``, ``runs.duckdb``) are therefore never held:
each write or read opens the file, does its work and closes it, and an open
that meets another process's lock is retried with jittered backoff until
``timeout_s`` passes, then fails with a retriable :class:`StoreBusyError`.

An open makes a database instance of its own unless ``via`` names one to
attach the file to: the audit trail's writes, once per signal batch, go
through :data:`SHARED_INSTANCE` (attach + detach ≈ 3.6 ms against ≈ 27 ms for
connect + close, benchmarks/RESULTS.md 2026-12-06). Either way the file's lock
is released when the unit of work ends.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import duckdb

from betrace.errors import SinkError
from betrace.sinks.attached import AttachedFiles
from betrace.sinks.duckdb_store import StoreBusyError

#: The process's instance for short opens on the hot path. Their work is a few rows,
#: so it never spills (no temporary directory to leave behind).
SHARED_INSTANCE = AttachedFiles(memory_mib=64, settings={"temp_directory": ""})

T = TypeVar("T")


def _is_lock_conflict(exc: duckdb.Error) -> bool:
    text = str(exc).lower()
    return "lock" in text or "conflicting" in text


def _retry_locked(path: Path, timeout_s: float, open_it: Callable[[], T]) -> T:
    """``open_it()``, retried while another process holds ``path``."""
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while True:
        try:
            return open_it()
        except duckdb.Error as exc:
            if not _is_lock_conflict(exc):
                msg = f"cannot open {path}: {exc}"
                raise SinkError(msg) from exc
            if time.monotonic() >= deadline:
                msg = f"{path} stayed locked by another process for {timeout_s:.0f} s; retry later"
                raise StoreBusyError(msg) from None
            time.sleep(delay * (0.5 + random.random()))  # noqa: S311 - jitter, not crypto
            delay = min(delay * 2, 0.2)


@contextmanager
def open_shared(
    path: Path, *, read_only: bool = False, timeout_s: float = 10.0, via: AttachedFiles | None = None
) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open ``path`` for one unit of work, waiting out other processes' short holds.

    With ``via``, the file is attached to that instance and detached afterwards;
    the caller must keep other opens of ``path`` in this process out meanwhile
    (the audit trail's :func:`~betrace.audit.schema.file_lock`).
    """
    if read_only and not path.exists():
        msg = f"{path} does not exist yet"
        raise SinkError(msg)
    if not read_only:
        path.parent.mkdir(parents=True, exist_ok=True)
    if via is None:
        con = _retry_locked(path, timeout_s, lambda: duckdb.connect(str(path), read_only=read_only))
        try:
            yield con
        finally:
            con.close()
        return
    name = _retry_locked(path, timeout_s, lambda: via.attach(path, read_only=read_only))
    try:
        con = via.cursor(name)
        try:
            yield con
        finally:
            con.close()
    finally:
        via.detach(name)
