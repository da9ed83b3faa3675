"""``worker.started`` / ``worker.stopped``: the root of everything a worker session records."""

from __future__ import annotations

import os
import socket
import time

from betrace import __version__
from betrace.audit.events import AuditEventType, AuditRecorder, EventRef
from betrace.config import Settings


def actor() -> str:
    return f"betrace-worker@{socket.gethostname()}"


class WorkerSession:
    """Records the start of a worker session and, once, its stop (child of the start)."""

    def __init__(self, audit: AuditRecorder, settings: Settings) -> None:
        self.audit = audit
        self.settings = settings
        self.started: EventRef | None = None
        self._started_at = 0.0
        self._stopped = False

    def start(self) -> EventRef:
        cfg = self.settings
        self._started_at = time.monotonic()
        self.started = self.audit.record(
            AuditEventType.WORKER_STARTED,
            actor=actor(),
            subject=f"worker {cfg.app_id} pid {os.getpid()}",
            payload={
                "app_id": cfg.app_id,
                "stages": cfg.stages,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "version": __version__,
                "brokers": cfg.brokers,
                "input_topic": cfg.topics.input,
            },
        )
        return self.started

    def stop(self, reason: str = "shutdown") -> None:
        if self.started is None or self._stopped:
            return
        self._stopped = True
        self.audit.record(
            AuditEventType.WORKER_STOPPED,
            actor=actor(),
            subject=f"worker {self.settings.app_id} pid {os.getpid()}",
            payload={"reason": reason, "uptime_s": round(time.monotonic() - self._started_at, 3)},
            parent=self.started,
        )

    def close(self) -> None:
        """Write what the process's recorder still buffers and stop it (idempotent)."""
        close = getattr(self.audit, "close", None)
        if callable(close):
            close()
