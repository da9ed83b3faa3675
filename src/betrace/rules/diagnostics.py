"""Limits on rule source and the shape of syntax-error messages.

Every parser raises :class:`~betrace.errors.RuleSyntaxError` through
:func:`syntax_error`, so that all three languages point at the offending spot
the same way::

    line 2, column 1: expected '}' but found 'always'
      always { audit.log }
      ^
"""

from __future__ import annotations

from betrace.errors import RuleSyntaxError

#: Longest accepted rule expression, in characters. Rules are authored by
#: tenants; the bound keeps parse and compile time predictable.
MAX_EXPRESSION_LENGTH = 10_000
#: Deepest accepted nesting of parentheses, braces, ``not`` and operators.
#: Recursive descent uses the Python stack, so this also guards recursion.
MAX_NESTING_DEPTH = 64
#: Largest accepted compiled regular-expression program (RE2 program size).
MAX_REGEX_PROGRAM_SIZE = 10_000


def line_column(source: str, offset: int) -> tuple[int, int]:
    """Return the 1-based line and column of character ``offset``."""
    offset = max(0, min(offset, len(source)))
    line = source.count("\n", 0, offset) + 1
    line_start = source.rfind("\n", 0, offset) + 1
    return line, offset - line_start + 1


def format_error(source: str, line: int, column: int, message: str) -> str:
    """Render ``message`` with the source line and a caret under ``column``."""
    lines = source.split("\n")
    text = lines[line - 1] if 0 < line <= len(lines) else ""
    # Tabs would shift the caret; show them as single spaces.
    text = text.replace("\t", " ")
    caret = " " * (column - 1) + "^"
    return f"line {line}, column {column}: {message}\n  {text}\n  {caret}"


def syntax_error(source: str, offset: int, message: str) -> RuleSyntaxError:
    """Build a :class:`RuleSyntaxError` pointing at character ``offset``."""
    line, column = line_column(source, offset)
    return RuleSyntaxError(format_error(source, line, column, message), line=line, column=column)


def check_length(source: str) -> None:
    """Reject expressions longer than :data:`MAX_EXPRESSION_LENGTH`."""
    if len(source) > MAX_EXPRESSION_LENGTH:
        msg = f"rule expression is {len(source)} characters long; the limit is {MAX_EXPRESSION_LENGTH}"
        raise RuleSyntaxError(msg, line=1, column=1)
    if not source.strip():
        raise syntax_error(source, 0, "rule expression is empty")
