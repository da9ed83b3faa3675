"""Real fault injection for resilience and chaos tests (no mocks).

``read_only_dir(path)`` makes a directory and every file in it refuse writes
for the duration of a ``with`` block — the fault of scenario 5 ("the DuckDB
directory becomes read-only").

Why ``chattr +i`` and not ``chmod``: the tests run as root in CI and in the dev
containers, and root ignores permission bits (``CAP_DAC_OVERRIDE``), so
``chmod 0o555`` would not stop a single write. The immutable attribute is
enforced for root too, and — unlike ``mount --bind -o ro``, which only affects
files opened *after* the mount — it also refuses writes through file
descriptors that are already open, such as DuckDB's open database and WAL
files: the next commit fails with ``Could not write file ...: Operation not
permitted``, exactly what a disk gone read-only looks like to the process.
It needs ``chattr`` (e2fsprogs), a filesystem with the attribute (ext2/3/4,
xfs, btrfs) and ``CAP_LINUX_IMMUTABLE``; :func:`immutable_supported` checks.
As a non-root user the helper falls back to ``chmod`` (enforced then).

Usage::

    from tests.faults import read_only_dir

    with read_only_dir(settings.data_dir):
        ...  # writes under data_dir fail with EPERM/EACCES
    # writable again, attributes restored even if the block raised
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _chattr(flag: str, paths: list[Path]) -> None:
    if paths:
        subprocess.run(["chattr", flag, *map(str, paths)], check=True, capture_output=True)


def _chattr_each(flag: str, paths: list[Path]) -> list[Path]:
    """``chattr`` every path that still exists; the ones changed. A file may vanish between
    listing and change (DuckDB removes a checkpointed ``.wal``): it needs no protection."""
    changed = []
    for path in paths:
        try:
            _chattr(flag, [path])
        except subprocess.CalledProcessError:
            if path.exists():
                raise
            continue
        changed.append(path)
    return changed


def immutable_supported(where: Path | None = None) -> bool:
    """Whether ``chattr +i`` works (as root) on the filesystem of ``where``."""
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        return False
    base = where if where is not None and where.is_dir() else None
    with tempfile.NamedTemporaryFile(dir=base) as probe:
        try:
            _chattr("+i", [Path(probe.name)])
        except subprocess.CalledProcessError:
            return False
        _chattr("-i", [Path(probe.name)])
    return True


def _tree(path: Path) -> list[Path]:
    return [path, *sorted(p for p in path.rglob("*") if p.is_file() or p.is_dir())]


@contextlib.contextmanager
def read_only_dir(path: Path) -> Iterator[None]:
    """``path`` and everything under it refuse writes inside the block (see module doc)."""
    with read_only_paths(_tree(path)):
        yield


@contextlib.contextmanager
def read_only_paths(targets: list[Path]) -> Iterator[None]:
    """Only ``targets`` (files or directories, not their contents) refuse writes inside the block.

    E.g. the embedded ledger alone (scenario 6 without a TigerBeetle server)::

        with read_only_paths([data_dir / "ledger.duckdb", data_dir / "ledger.duckdb.wal"]):
            ...

    Only paths that exist are changed. A DuckDB file whose ``.wal`` does not exist
    yet keeps accepting commits (DuckDB creates the WAL in the writable directory),
    so include the directory or make sure the WAL exists when that matters.
    """
    targets = [p for p in targets if p.exists()]
    path = targets[0] if targets else Path(tempfile.gettempdir())
    if os.geteuid() == 0:
        if not immutable_supported(path if path.is_dir() else path.parent):
            msg = f"cannot make {path} read-only as root: chattr +i is not supported there"
            raise RuntimeError(msg)
        changed = _chattr_each("+i", targets)
        try:
            yield
        finally:
            _chattr_each("-i", changed)
        return
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in targets}
    for p in targets:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        yield
    finally:
        for p, mode in modes.items():
            with contextlib.suppress(FileNotFoundError):
                p.chmod(mode)
