"""Cold storage over ``pyarrow.fs``: a local directory or an S3-compatible bucket.

One implementation serves both: the backends differ only in the pyarrow
filesystem and the base path. On the local filesystem ``put`` writes a
temporary sibling and renames it over the target (atomic on POSIX); an S3
``PUT`` is atomic by itself. Credentials are held as ``SecretStr`` and handed
to pyarrow only; ``repr`` and log lines show the endpoint and bucket, never a
key.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pyarrow.fs as pafs
from pydantic import SecretStr

from betrace.config.sections import ColdStorageSettings
from betrace.sinks.cold.base import (
    CHUNK,
    ColdObjectMissingError,
    ColdStorageError,
    ObjectStat,
    check_key,
    sha256_stream,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ArrowColdStorage:
    """:class:`~betrace.sinks.cold.base.ColdStorage` on any pyarrow filesystem under ``base``."""

    def __init__(self, fs: pafs.FileSystem, base: str, *, backend: str, where: str) -> None:
        self._fs = fs
        self._base = base.rstrip("/")
        self.backend = backend
        self._where = where

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._where})"

    def _path(self, key: str) -> str:
        return f"{self._base}/{check_key(key)}"

    def _call(self, what: str, key: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except FileNotFoundError:
            msg = f"cold storage {self._where}: {key} does not exist"
            raise ColdObjectMissingError(msg) from None
        except OSError as exc:  # pyarrow's ArrowIOError is an OSError
            text = str(exc)
            if "NoSuchKey" in text or "Path does not exist" in text or "NoSuchBucket" in text:
                msg = f"cold storage {self._where}: {key} does not exist"
                raise ColdObjectMissingError(msg) from None
            msg = f"cold storage {self._where}: {what} {key} failed: {text[:300]}"
            raise ColdStorageError(msg) from exc

    def arrow_filesystem(self) -> tuple[pafs.FileSystem, str]:
        return self._fs, self._base

    def _parent(self, path: str) -> None:
        parent = path.rpartition("/")[0]
        if parent and self.backend == "filesystem":
            self._fs.create_dir(parent, recursive=True)

    def _write(self, key: str, chunks: Iterator[bytes]) -> ObjectStat:
        path = self._path(key)
        digest, size = hashlib.sha256(), 0

        def run() -> None:
            nonlocal size
            self._parent(path)
            # Local: write a sibling, then rename (atomic). S3: a PUT replaces atomically.
            target = f"{path}.{uuid.uuid4().hex[:8]}.tmp" if self.backend == "filesystem" else path
            try:
                with self._fs.open_output_stream(target) as out:
                    for chunk in chunks:
                        digest.update(chunk)
                        size += len(chunk)
                        out.write(chunk)
                if target != path:
                    self._fs.move(target, path)
            except BaseException:
                if target != path:
                    with contextlib.suppress(OSError):
                        self._fs.delete_file(target)
                raise

        self._call("upload of", key, run)
        return ObjectStat(key, size, digest.hexdigest())

    def put(self, key: str, data: bytes) -> ObjectStat:
        return self._write(key, iter([data]))

    def put_file(self, key: str, path: Path) -> ObjectStat:
        def chunks() -> Iterator[bytes]:
            with path.open("rb") as fh:
                while chunk := fh.read(CHUNK):
                    yield chunk

        return self._write(key, chunks())

    def get(self, key: str) -> bytes:
        def run() -> bytes:
            with self._fs.open_input_stream(self._path(key)) as src:
                return bytes(src.read())

        return self._call("download of", key, run)

    def get_file(self, key: str, path: Path) -> ObjectStat:
        def run() -> ObjectStat:
            digest, size = hashlib.sha256(), 0
            path.parent.mkdir(parents=True, exist_ok=True)
            with self._fs.open_input_stream(self._path(key)) as src, path.open("wb") as out:
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
            return ObjectStat(key, size, digest.hexdigest())

        return self._call("download of", key, run)

    def exists(self, key: str) -> bool:
        info = self._call("lookup of", key, lambda: self._fs.get_file_info(self._path(key)))
        return bool(info.type == pafs.FileType.File)

    def stat(self, key: str) -> ObjectStat:
        def run() -> ObjectStat:
            info = self._fs.get_file_info(self._path(key))
            if info.type != pafs.FileType.File:
                raise FileNotFoundError(key)
            with self._fs.open_input_stream(self._path(key)) as src:
                size, sha = sha256_stream(src)
            return ObjectStat(key, size, sha)

        return self._call("stat of", key, run)

    def list(self, prefix: str = "") -> Iterator[ObjectStat]:
        prefix = prefix.strip("/")
        base = f"{self._base}/{check_key(prefix)}" if prefix else self._base

        def run() -> list[pafs.FileInfo]:
            selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
            return list(self._fs.get_file_info(selector))

        infos = self._call("listing of", prefix or "/", run)
        skip = len(self._base) + 1
        found = sorted(
            (info.path[skip:], int(info.size or 0))
            for info in infos
            if info.type == pafs.FileType.File and not info.path.endswith(".tmp")
        )
        for key, size in found:
            yield ObjectStat(key, size, "")

    def delete(self, key: str) -> bool:
        def run() -> bool:
            path = self._path(key)
            if self._fs.get_file_info(path).type != pafs.FileType.File:
                return False
            self._fs.delete_file(path)
            return True

        return self._call("delete of", key, run)


class FilesystemColdStorage(ArrowColdStorage):
    """Cold storage in a local (or mounted network) directory; the default."""

    def __init__(self, root: Path) -> None:
        root = root.resolve()
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            msg = f"cold storage: cannot create {root}: {exc}"
            raise ColdStorageError(msg) from exc
        super().__init__(pafs.LocalFileSystem(), str(root), backend="filesystem", where=str(root))
        self.root = root


class S3ColdStorage(ArrowColdStorage):
    """Cold storage in an S3-compatible bucket (AWS, MinIO, Ceph, moto, ...)."""

    def __init__(
        self,
        *,
        bucket: str,
        endpoint: str | None = None,
        region: str = "us-east-1",
        access_key: SecretStr | None = None,
        secret_key: SecretStr | None = None,
        prefix: str = "",
        timeout_s: float = 10.0,
        create_bucket: bool = False,
    ) -> None:
        scheme, override = None, None
        if endpoint:
            scheme, sep, rest = endpoint.partition("://")
            if not sep:
                scheme, rest = "https", endpoint
            override = rest.rstrip("/")
        fs = pafs.S3FileSystem(
            access_key=access_key.get_secret_value() if access_key else None,
            secret_key=secret_key.get_secret_value() if secret_key else None,
            region=region,
            scheme=scheme,
            endpoint_override=override,
            connect_timeout=timeout_s,
            request_timeout=timeout_s,
            allow_bucket_creation=create_bucket,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
        )
        base = f"{bucket}/{prefix.strip('/')}" if prefix.strip("/") else bucket
        where = f"s3://{base} at {endpoint or 'AWS'}"
        super().__init__(fs, base, backend="s3", where=where)
        if create_bucket:
            self._call("creation of bucket", bucket, lambda: fs.create_dir(bucket))
        self.bucket = bucket


def open_cold_storage(cold: ColdStorageSettings, data_dir: Path) -> ArrowColdStorage:
    """The configured backend (``BETRACE_COLD__*``); the filesystem one defaults to ``<data_dir>/cold``."""
    if cold.backend == "s3":
        return S3ColdStorage(
            bucket=cold.bucket,
            endpoint=cold.endpoint,
            region=cold.region,
            access_key=cold.access_key,
            secret_key=cold.secret_key,
            prefix=cold.prefix,
            timeout_s=cold.timeout_s,
        )
    return FilesystemColdStorage(cold.path or data_dir / "cold")
