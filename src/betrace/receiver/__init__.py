"""OTLP/HTTP receiver: ``POST /v1/traces`` (protobuf or JSON, optionally gzip) onto the input topic."""

from betrace.receiver.codec import BodyError
from betrace.receiver.service import (
    PATH,
    STEP_ID,
    LagGate,
    PressureSource,
    Receiver,
    build_app,
    ingest_group,
    pressure_from,
)

__all__ = [
    "PATH",
    "STEP_ID",
    "BodyError",
    "LagGate",
    "PressureSource",
    "Receiver",
    "build_app",
    "ingest_group",
    "pressure_from",
]
