"""Assemble stage: group spans per trace in bounded windows and close due traces.

The implementation lives in :mod:`betrace.agents.assembly`; this module keeps
the stage's public names where the faust wiring and the tests import them.
"""

from __future__ import annotations

from betrace.agents.assembly.assembler import (
    DECISIONS_TABLE,
    STEP_ID,
    TRACES_TABLE,
    ClosedTraces,
    Dropped,
    StateWrite,
    TraceAssembler,
)

__all__ = [
    "DECISIONS_TABLE",
    "STEP_ID",
    "TRACES_TABLE",
    "ClosedTraces",
    "Dropped",
    "StateWrite",
    "TraceAssembler",
]
