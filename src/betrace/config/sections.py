"""Nested sections of :class:`betrace.config.Settings`, one per subsystem.

Each is frozen and forbids unknown keys; env names use ``__``, e.g.
``BETRACE_ARCHIVE__SCHEDULE=02:00``, and a TOML file uses a ``[archive]`` table.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ColdStorageSettings(_Section):
    """Where archived Parquet files go (issue 6)."""


class ArchiveSettings(_Section):
    """The daily archival job and the cleanup policies (issue 6)."""


class ResilienceSettings(_Section):
    """Circuit breakers, the durable spool and backpressure (issue 7)."""


class CacheSettings(_Section):
    """The Redis cache tier and its in-process fallback (issue 7)."""


class ReceiverSettings(_Section):
    """The OTLP/HTTP receiver, ``POST /v1/traces`` (issue 7)."""


class AuditSettings(_Section):
    """The audit trail (issue 9)."""


class IntegritySettings(_Section):
    """Ingestion runs and trace integrity checks (issue 9)."""
