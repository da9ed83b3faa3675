"""The tokenizer and parser base shared by the three rule languages.

One lexer serves the BeTrace DSL, TraceQL and the sequence language, which
is what lets a DSL condition embed a TraceQL spanset filter: both parsers
read the same token stream. Tokens remember their character offsets so that
errors can point at them and so that dotted names can require adjacency
(``span.http.url`` is one name, ``span . http`` is not).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, NoReturn

from betrace.rules.diagnostics import MAX_NESTING_DEPTH, check_length, syntax_error

TokenKind = Literal["ident", "number", "duration", "string", "op", "eof"]

# Longest operators first so that ``&>>`` wins over ``&>`` and ``>``.
_OPERATORS = (
    "&>>", "&<<", "!>>", "!<<",
    ">>", "<<", "&>", "&<", "&~", "!>", "!<", "==", "!=", ">=", "<=", "=~", "!~", "&&", "||",
    "{", "}", "(", ")", "[", "]", ",", ".", ":", "|", "~", "=", ">", "<", "!", "+", "-", "*",
    "/", "%", "^",
)  # fmt: skip
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_DURATION = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?(?:ns|us|µs|ms|s|m|h))+(?![A-Za-z0-9_])")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_NS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 10**9, "m": 60 * 10**9}
_UNIT_NS["h"] = 3600 * 10**9
_ESCAPES = {'"': '"', "'": "'", "\\": "\\", "/": "/", "n": "\n", "t": "\t", "r": "\r"}
_ESCAPES |= {"b": "\b", "f": "\f"}


@dataclass(frozen=True, slots=True)
class Token:
    """One lexeme: ``value`` holds the decoded literal for numbers and strings."""

    kind: TokenKind
    text: str
    value: str | int | float
    pos: int
    end: int

    def describe(self) -> str:
        """How the token reads in an error message."""
        if self.kind == "eof":
            return "end of input"
        return repr(self.text)


def tokenize(source: str) -> list[Token]:
    """Split ``source`` into tokens, ending with an ``eof`` token."""
    check_length(source)
    tokens: list[Token] = []
    i, n = 0, len(source)
    while i < n:
        ch = source[i]
        if ch.isspace():
            i += 1
        elif source.startswith("//", i):
            newline = source.find("\n", i)
            i = n if newline < 0 else newline
        elif "0" <= ch <= "9":
            tokens.append(_number(source, i))
            i = tokens[-1].end
        elif ch in "\"'`":
            tokens.append(_string(source, i))
            i = tokens[-1].end
        elif (m := _IDENT.match(source, i)) is not None:
            tokens.append(Token("ident", m.group(), m.group(), i, m.end()))
            i = m.end()
        else:
            op = next((o for o in _OPERATORS if source.startswith(o, i)), None)
            if op is None:
                msg = f"unexpected character {ch!r}"
                raise syntax_error(source, i, msg)
            tokens.append(Token("op", op, op, i, i + len(op)))
            i += len(op)
    tokens.append(Token("eof", "", "", n, n))
    return tokens


def _number(source: str, start: int) -> Token:
    duration = _DURATION.match(source, start)
    if duration is not None:
        # Go-style compound durations such as ``1h30m`` are one token.
        parts = _DURATION_PART.findall(duration.group())
        total = sum(float(amount) * _UNIT_NS[unit] for amount, unit in parts)
        return Token("duration", duration.group(), round(total), start, duration.end())
    m = _NUMBER.match(source, start)
    assert m is not None
    end = m.end()
    if end < len(source) and (source[end].isalpha() or source[end] == "_"):
        msg = f"malformed number {source[start : end + 1]!r}"
        raise syntax_error(source, start, msg)
    text = m.group()
    value: int | float = float(text) if any(c in text for c in ".eE") else int(text)
    return Token("number", text, value, start, end)


def _string(source: str, start: int) -> Token:
    quote = source[start]
    out: list[str] = []
    i = start + 1
    while i < len(source):
        ch = source[i]
        if ch == quote:
            return Token("string", source[start : i + 1], "".join(out), start, i + 1)
        if ch == "\\" and quote != "`":
            i += 1
            esc = source[i : i + 1]
            if esc == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", source[i + 1 : i + 5]):
                out.append(chr(int(source[i + 1 : i + 5], 16)))
                i += 5
                continue
            if esc not in _ESCAPES:
                msg = f"unknown escape sequence '\\{esc}' in string"
                raise syntax_error(source, i - 1, msg)
            out.append(_ESCAPES[esc])
        elif ch == "\n" and quote != "`":
            break
        else:
            out.append(ch)
        i += 1
    msg = "unterminated string literal"
    raise syntax_error(source, start, msg)


class Parser:
    """Cursor over a token list with the error and nesting helpers parsers share."""

    def __init__(self, source: str, tokens: list[Token] | None = None, index: int = 0) -> None:
        self.source = source
        self.tokens = tokenize(source) if tokens is None else tokens
        self.index = index
        self.depth = 0

    @property
    def tok(self) -> Token:
        return self.tokens[self.index]

    def peek(self, ahead: int = 1) -> Token:
        return self.tokens[min(self.index + ahead, len(self.tokens) - 1)]

    def advance(self) -> Token:
        tok = self.tokens[self.index]
        if tok.kind != "eof":
            self.index += 1
        return tok

    def at(self, *texts: str) -> bool:
        """True when the current token is an operator or identifier in ``texts``."""
        tok = self.tok
        return tok.kind in ("op", "ident") and tok.text in texts

    def at_op(self, *ops: str) -> bool:
        return self.tok.kind == "op" and self.tok.text in ops

    def at_word(self, *words: str) -> bool:
        return self.tok.kind == "ident" and self.tok.text in words

    def accept(self, text: str) -> Token | None:
        if self.at(text):
            return self.advance()
        return None

    def expect(self, text: str, context: str = "") -> Token:
        if self.at(text):
            return self.advance()
        return self.error(f"expected {text!r}{context}")

    def error(self, expected: str, tok: Token | None = None) -> NoReturn:
        """Fail at ``tok`` (default: the current token) saying what was expected."""
        tok = self.tok if tok is None else tok
        raise syntax_error(self.source, tok.pos, f"{expected} but found {tok.describe()}")

    def fail(self, message: str, tok: Token | None = None) -> NoReturn:
        """Fail at ``tok`` (default: the current token) with ``message``."""
        tok = self.tok if tok is None else tok
        raise syntax_error(self.source, tok.pos, message)

    def expect_end(self) -> None:
        if self.tok.kind != "eof":
            self.error("expected end of rule")

    def adjacent(self) -> bool:
        """True when the current token starts right where the previous one ended."""
        return self.index > 0 and self.tokens[self.index - 1].end == self.tok.pos

    @contextmanager
    def nested(self) -> Iterator[None]:
        """Count one level of nesting; fail beyond :data:`MAX_NESTING_DEPTH`."""
        self.depth += 1
        try:
            if self.depth > MAX_NESTING_DEPTH:
                msg = f"expression nests deeper than {MAX_NESTING_DEPTH} levels"
                self.fail(msg)
            yield
        finally:
            self.depth -= 1

    def dotted_name(self, what: str) -> tuple[str, Token]:
        """Parse ``a.b.c`` (segments adjacent, quoted segments allowed).

        Stops before ``.where(`` so that the DSL can chain filters on a span
        reference.
        """
        first = self.tok
        if first.kind not in ("ident", "string"):
            self.error(f"expected {what}")
        parts = [str(self.advance().value)]
        while (
            self.at_op(".")
            and self.adjacent()
            and self.peek().kind in ("ident", "string", "number")
            and self.peek().pos == self.tok.end
            and not (self.peek().text == "where" and self.peek(2).text == "(")
        ):
            self.advance()
            seg = self.advance()
            parts.append(seg.text if seg.kind == "number" else str(seg.value))
        return ".".join(parts), first
