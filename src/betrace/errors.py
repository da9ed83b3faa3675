"""The BeTrace error hierarchy.

Every error derives from :class:`BetraceError` and says whether retrying the
same operation can succeed (the aiokafka convention), so that stages can
decide between retry, dead-letter and crash without string matching.
"""

from __future__ import annotations


class BetraceError(Exception):
    """Root of every error BeTrace raises on purpose."""

    retriable: bool = False


class ConfigError(BetraceError):
    """The settings are invalid; the process must not start."""


class DecodeError(BetraceError):
    """A Kafka record could not be turned into spans."""

    #: The reason header written to the dead-letter topic.
    reason: str = "decode_error"


class KeyDecodeError(DecodeError):
    """The record key is not a valid trace id."""

    reason = "invalid_key"


class ValueDecodeError(DecodeError):
    """The record value is not a valid OTLP ``ExportTraceServiceRequest``."""

    reason = "invalid_value"


class RuleError(BetraceError):
    """A rule is malformed or cannot be compiled."""


class RuleSyntaxError(RuleError):
    """A rule expression does not parse; the message points at the spot."""

    def __init__(self, msg: str, *, line: int = 1, column: int = 1) -> None:
        super().__init__(msg)
        self.line = line
        self.column = column


class SinkError(BetraceError):
    """A sink failed to write a batch."""

    retriable = True


class BackpressureError(SinkError):
    """A destination is full; the caller must pause instead of buffering."""


class BrokerError(BetraceError):
    """The Kafka broker is unreachable or misbehaving."""

    retriable = True


class DevEnvironmentError(BetraceError):
    """The local development services could not be set up."""


class CircuitOpenError(BetraceError):
    """A dependency's circuit breaker is open; the call was not attempted.

    Retriable: the caller spools the write or pauses, and retries once the
    breaker lets a trial call through.
    """

    retriable = True

    def __init__(self, msg: str, *, breaker: str = "") -> None:
        super().__init__(msg)
        self.breaker = breaker


class SpoolCorruptError(BetraceError):
    """A spool segment holds a record whose checksum or framing is wrong."""


class RuleQuarantinedError(RuleError):
    """A rule was quarantined after repeated evaluation failures."""


class RuleEvaluationError(RuleError):
    """A rule raised while evaluating a batch; retried until the rule is quarantined."""

    retriable = True
