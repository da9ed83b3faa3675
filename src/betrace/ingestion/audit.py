"""The audit recorder ingestion runs use: the DuckDB audit store when it is built in."""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, cast

from betrace.audit import AuditRecorder, NullAuditRecorder

if TYPE_CHECKING:
    from betrace.config import Settings

logger = logging.getLogger(__name__)


def recorder_for(settings: Settings) -> AuditRecorder:
    """``betrace.audit.store.recorder_for(settings)``, else a recorder that keeps nothing."""
    try:
        module = importlib.import_module("betrace.audit.store")
    except ImportError:
        return NullAuditRecorder()
    factory = getattr(module, "recorder_for", None)
    if factory is None:
        return NullAuditRecorder()
    try:
        return cast(AuditRecorder, factory(settings))
    except Exception:
        logger.warning("audit store unavailable; ingestion runs keep no audit events", exc_info=True)
        return NullAuditRecorder()
