"""The cold storage contract (PRD-002c): a flat key space of immutable-looking objects.

Keys are ``/``-separated relative paths (``acme/2026/11/24/spans-0000.parquet``).
Every backend offers the same six operations, so the archival job and the
query layer never know where the bytes live. ``put`` replaces an object
atomically (readers see the old or the new bytes, never a mix), which makes
re-uploads after a crash safe. Failures are :class:`ColdStorageError`
(retriable: access refused, disk full, endpoint away) or
:class:`ColdObjectMissingError` (not retriable).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

import pyarrow.fs as pafs

from betrace.errors import SinkError

CHUNK = 4 << 20
_KEY_RE = re.compile(r"^[A-Za-z0-9_.=\-]+(/[A-Za-z0-9_.=\-]+)*$")


class ColdStorageError(SinkError):
    """Cold storage refused or failed a request (access, space, network); retrying may help."""

    retriable = True


class ColdObjectMissingError(ColdStorageError):
    """The object does not exist."""

    retriable = False


@dataclass(frozen=True, slots=True)
class ObjectStat:
    key: str
    size: int
    #: Hex SHA-256 of the object's bytes.
    sha256: str


def check_key(key: str) -> str:
    """Reject keys that could escape the root or that object stores treat differently."""
    if not _KEY_RE.match(key) or any(part in {".", ".."} for part in key.split("/")):
        msg = f"invalid cold storage key {key!r}: use relative a/b/c names of [A-Za-z0-9_.=-]"
        raise ValueError(msg)
    return key


def sha256_stream(stream: BinaryIO) -> tuple[int, str]:
    """(size, hex SHA-256) of everything readable from ``stream``."""
    digest, size = hashlib.sha256(), 0
    while chunk := stream.read(CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def sha256_file(path: Path) -> tuple[int, str]:
    with path.open("rb") as fh:
        return sha256_stream(fh)


@runtime_checkable
class ColdStorage(Protocol):
    """Where archived files live; blocking calls, safe from several threads."""

    #: ``filesystem`` or ``s3``, for logs and ``storage stats``.
    backend: str

    def put(self, key: str, data: bytes) -> ObjectStat:
        """Store ``data`` under ``key``, atomically replacing any previous object."""
        ...

    def put_file(self, key: str, path: Path) -> ObjectStat:
        """Upload a local file (streamed), atomically replacing any previous object."""
        ...

    def get(self, key: str) -> bytes:
        """The whole object; :class:`ColdObjectMissingError` if absent."""
        ...

    def get_file(self, key: str, path: Path) -> ObjectStat:
        """Download ``key`` into ``path`` (streamed); return what was read."""
        ...

    def exists(self, key: str) -> bool: ...

    def stat(self, key: str) -> ObjectStat:
        """Size and SHA-256 computed from the stored bytes (reads the object)."""
        ...

    def list(self, prefix: str = "") -> Iterator[ObjectStat]:
        """Objects under ``prefix`` (a key prefix ending at a ``/``), sorted; ``sha256`` is empty."""
        ...

    def delete(self, key: str) -> bool:
        """Remove ``key``; False if it was not there (deleting twice is fine)."""
        ...

    def arrow_filesystem(self) -> tuple[pafs.FileSystem, str]:
        """A pyarrow filesystem and the base path keys are relative to (for dataset scans)."""
        ...
