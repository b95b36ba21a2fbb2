"""Syntax tree of a `.kd` spec. Every node keeps the span of the text it came from.

Names are stored in canonical spelling (see `kdsl.parse.canonical_name`):
`lambda`, `λ` and the look-alike `𝜆` all become `λ`, so later stages never
compare spellings. `Name.text` keeps the spelling as written, for messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from kdsl.errors import Span


@dataclass(frozen=True)
class Number:
    value: float
    text: str
    span: Span = field(compare=False)


@dataclass(frozen=True)
class String:
    value: str
    span: Span = field(compare=False)


@dataclass(frozen=True)
class Name:
    id: str  # canonical spelling
    text: str  # as written
    span: Span = field(compare=False)


@dataclass(frozen=True)
class BinaryOp:
    op: str  # "+", "-", "*", "/", "^"
    left: "Expr"
    right: "Expr"
    span: Span = field(compare=False)


@dataclass(frozen=True)
class Compare:
    op: str  # "<", "<=", ">", ">=", "=="
    left: "Expr"
    right: "Expr"
    span: Span = field(compare=False)


@dataclass(frozen=True)
class Negate:
    operand: "Expr"
    span: Span = field(compare=False)


@dataclass(frozen=True)
class Keyword:
    """`name = value` inside brackets or a call: `o[τ=2]`, `adaptive(d_q, d_data, step=0.1)`."""

    name: Name
    value: "Expr"
    span: Span = field(compare=False)


@dataclass(frozen=True)
class Subscript:
    """`base[items]`: `o[τ=2]`, `JS[0.5]`, `Df[f]`."""

    base: "Expr"
    items: tuple["Expr | Keyword", ...]
    span: Span = field(compare=False)


@dataclass(frozen=True)
class Call:
    """`func(args)`; `separators` records ',' or '‖' between the arguments."""

    func: "Expr"
    args: tuple["Expr | Keyword", ...]
    separators: tuple[str, ...]
    span: Span = field(compare=False)


@dataclass(frozen=True)
class Project:
    """`o→q`: a model's distribution projected into the other vocabulary."""

    source: "Expr"
    target: Name
    span: Span = field(compare=False)


@dataclass(frozen=True)
class Expectation:
    """`E[w ~ D] body`."""

    variable: Name
    distribution: "Expr"
    body: "Expr"
    span: Span = field(compare=False)
    head_span: Span = field(compare=False, default=None)  # the `E[w ~ D]` part


Expr = Union[Number, String, Name, BinaryOp, Compare, Negate, Subscript, Call, Project, Expectation]


@dataclass(frozen=True)
class Assignment:
    target: Name
    value: Expr
    span: Span = field(compare=False)


@dataclass(frozen=True)
class Definition:
    name: Name
    params: tuple[Name, ...]
    body: Expr
    span: Span = field(compare=False)


@dataclass(frozen=True)
class EvalItem:
    name: Name
    args: tuple["Expr | Keyword", ...]
    span: Span = field(compare=False)


@dataclass(frozen=True)
class EvalLine:
    items: tuple[EvalItem, ...]
    span: Span = field(compare=False)


Statement = Union[Assignment, Definition, EvalLine]


@dataclass(frozen=True)
class Spec:
    statements: tuple[Statement, ...]
    path: str
    text: str


def walk(node):
    """Yield `node` and every expression node below it, depth first."""
    yield node
    if isinstance(node, (BinaryOp, Compare)):
        yield from walk(node.left)
        yield from walk(node.right)
    elif isinstance(node, Negate):
        yield from walk(node.operand)
    elif isinstance(node, Keyword):
        yield from walk(node.value)
    elif isinstance(node, Subscript):
        yield from walk(node.base)
        for item in node.items:
            yield from walk(item)
    elif isinstance(node, Call):
        yield from walk(node.func)
        for arg in node.args:
            yield from walk(arg)
    elif isinstance(node, Project):
        yield from walk(node.source)
        yield node.target
    elif isinstance(node, Expectation):
        yield node.variable
        yield from walk(node.distribution)
        yield from walk(node.body)
