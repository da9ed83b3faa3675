"""Logging under the one ``betrace`` package logger: text, logfmt or JSON lines."""

from __future__ import annotations

import logging
import sys
from typing import Literal

import orjson

PACKAGE_LOGGER = "betrace"
#: Libraries whose warnings and crashes a worker's operator must see (a crashed faust
#: service stops the worker without a word of ours).
LIBRARY_LOGGERS = ("faust", "mode", "aiokafka")

_STD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update({k: v for k, v in record.__dict__.items() if k not in _STD})
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


class _LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage().replace('"', '\\"')
        line = (
            f"ts={self.formatTime(record, '%Y-%m-%dT%H:%M:%S')} level={record.levelname.lower()} "
            f'logger={record.name} msg="{msg}"'
        )
        if record.exc_info:
            line += ' exc="' + self.formatException(record.exc_info).replace("\n", "\\n") + '"'
        return line


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at emit time (test runners swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        del value


def configure_logging(level: str = "INFO", fmt: Literal["text", "json", "logfmt"] = "text") -> logging.Logger:
    """Install one stderr handler on the package logger (idempotent)."""
    logger = logging.getLogger(PACKAGE_LOGGER)
    logger.setLevel(level)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = _StderrHandler()
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    elif fmt == "logfmt":
        handler.setFormatter(_LogfmtFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    return logger


def include_library_logs() -> None:
    """A long-running worker: its libraries' warnings go through the package handler too.

    CLI commands leave them out; they turn a library's failure into one clear error line.
    """
    package = logging.getLogger(PACKAGE_LOGGER)
    for name in LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        for old in list(library.handlers):
            library.removeHandler(old)
        for handler in package.handlers:
            library.addHandler(handler)
        library.setLevel(max(logging.WARNING, package.getEffectiveLevel()))
        library.propagate = False
