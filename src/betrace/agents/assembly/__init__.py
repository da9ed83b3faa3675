"""Streaming trace assembly: bounded sliding windows, limits, late spans, durable state.

* :mod:`.assembler` -- :class:`TraceAssembler`, the per-worker state machine;
* :mod:`.summary` -- per-rule window summaries and which rule forms are exact;
* :mod:`.sequence` -- the summary of ``followed_by`` rules (B cover, pending A spans);
* :mod:`.state` -- the open-trace / decision entries kept in faust tables.
"""
