"""Shared CLI plumbing: settings loading and error reporting."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console

from betrace.config import Settings, load_settings
from betrace.errors import BetraceError
from betrace.logs import configure_logging

logger = logging.getLogger(__name__)

console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])


class State:
    """Options of the top-level command, shared with sub-commands."""

    config: Path | None = None
    log_level: str | None = None


STATE = State()


def settings(**overrides: Any) -> Settings:
    """Load the settings once per command, failing with a readable message."""
    if STATE.log_level:
        overrides.setdefault("log_level", STATE.log_level)
    with fail_clearly():
        loaded = load_settings(STATE.config, **overrides)
    configure_logging(loaded.log_level, loaded.log_format)
    return loaded


@contextmanager
def fail_clearly() -> Iterator[None]:
    """Turn BeTrace errors into a one-line message and exit code 1 (never a traceback)."""
    try:
        yield
    except BetraceError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        console.print("interrupted")
        raise typer.Exit(130) from None


def project_root() -> Path:
    """The nearest directory holding BeTrace's ``scripts/kafka/pom.xml``, else the cwd."""
    here = Path.cwd().resolve()
    for candidate in (here, *here.parents):
        if (candidate / "scripts" / "kafka" / "pom.xml").is_file():
            return candidate
    return here
