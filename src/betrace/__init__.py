"""BeTrace: behavioural assurance for OpenTelemetry traces, as a Kafka stream processor."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
