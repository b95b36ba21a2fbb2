"""The one error family of kdsl and the renderer every diagnostic goes through.

A diagnostic has a stable code (`KD101`), a severity, a message that states what
was found and what was expected, a span in the user's text and a hint. It
renders as

    error[KD101]: unknown name 'lamda'
      --> specs/wsgo.kd:9:12
       |
     9 | objective = lamda(t, w) · KL(o ‖ q)
       |             ^^^^^
       = hint: did you mean 'λ'?
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """A range of the user's text: 1-based line and column, end exclusive."""

    path: str
    line: int
    column: int
    end_line: int
    end_column: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.column}"

    @property
    def position(self) -> str:
        return f"{self.line}:{self.column}"


@dataclass(frozen=True)
class Diagnostic:
    """One error or warning about a spec."""

    code: str
    message: str
    span: Span | None = None
    hint: str | None = None
    severity: str = "error"  # "error" or "warning"

    def sort_key(self) -> tuple:
        if self.span is None:
            return ("", 0, 0, self.code)
        return (self.span.path, self.span.line, self.span.column, self.code)

    def render(self, source: str | None = None) -> str:
        """Render the diagnostic with the offending source line and an underline."""
        lines = [f"{self.severity}[{self.code}]: {self.message}"]
        if self.span is not None:
            lines.append(f"  --> {self.span}")
            source_line = _line_of(source, self.span.line) if source is not None else None
            if source_line is not None:
                number = str(self.span.line)
                gutter = " " * len(number)
                start = self.span.column - 1
                end = self.span.end_column - 1 if self.span.end_line == self.span.line else len(source_line)
                prefix = _display_prefix(source_line, start)
                width = max(1, _display_width(source_line[start:end]))
                lines.append(f" {gutter} |")
                lines.append(f" {number} | {_visible(source_line)}")
                lines.append(f" {gutter} | {prefix}{'^' * width}")
        if self.hint:
            lines.append(f"  = hint: {self.hint}")
        return "\n".join(lines)


def _line_of(source: str, line: int) -> str | None:
    lines = source.split("\n")
    if 1 <= line <= len(lines):
        return lines[line - 1].rstrip("\r")
    if line == len(lines) + 1:
        return ""
    return None


def _display_prefix(line: str, count: int) -> str:
    """Blank out the first `count` characters of `line`, keeping tabs so the caret lines up."""
    return "".join("\t" if ch == "\t" else " " * _char_width(ch) for ch in line[:count])


def _char_width(ch: str) -> int:
    """Return the terminal columns of one character: 2 for wide East Asian characters, else 1."""
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def _display_width(text: str) -> int:
    return sum(_char_width(ch) for ch in text)


def _visible(line: str) -> str:
    """Replace control and format characters (NUL, bidirectional overrides) so the echoed line is safe to print."""
    return "".join(ch if ch == "\t" or unicodedata.category(ch) not in ("Cc", "Cf") else "\ufffd" for ch in line)


class KdslError(Exception):
    """Base class of every error kdsl raises on purpose."""


class SpecError(KdslError):
    """A spec failed to parse or validate; carries every diagnostic found, sorted."""

    def __init__(self, diagnostics: list[Diagnostic], source: str | None = None):
        self.diagnostics = sorted(diagnostics, key=Diagnostic.sort_key)
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        errors = [d for d in self.diagnostics if d.severity == "error"]
        blocks = [d.render(self.source) for d in self.diagnostics]
        count = len(errors)
        summary = f"{count} error{'s' if count != 1 else ''} in spec"
        return "\n\n".join(blocks + [summary])

    @property
    def codes(self) -> list[str]:
        return [d.code for d in self.diagnostics]


class ConfigError(KdslError):
    """Invalid run configuration outside a spec: a missing file, an unknown model, a bad flag."""


class InternalError(KdslError):
    """A bug in kdsl itself: an invariant of the IR or the lowering was broken."""

    def __init__(self, message: str, graph_text: str | None = None):
        text = f"internal error (a bug in kdsl, please report it): {message}"
        if graph_text:
            text += "\n\ncompiled graph:\n" + graph_text
        super().__init__(text)
