"""Cold storage (PRD-002c): archived Parquet files on a filesystem or an S3-compatible store."""

from betrace.sinks.cold.arrowfs import (
    ArrowColdStorage,
    FilesystemColdStorage,
    S3ColdStorage,
    open_cold_storage,
)
from betrace.sinks.cold.base import (
    ColdObjectMissingError,
    ColdStorage,
    ColdStorageError,
    ObjectStat,
    sha256_file,
)

__all__ = [
    "ArrowColdStorage",
    "ColdObjectMissingError",
    "ColdStorage",
    "ColdStorageError",
    "FilesystemColdStorage",
    "ObjectStat",
    "S3ColdStorage",
    "open_cold_storage",
    "sha256_file",
]
