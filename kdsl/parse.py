"""Parse `.kd` text into the syntax tree of `kdsl.ast`.

The grammar lives in `grammar/kd.lark` (LALR). Lark's exceptions are turned
into kdsl diagnostics here, so its internal terminal names never reach the
user.
"""

from __future__ import annotations

import functools
import unicodedata
from importlib import resources
from pathlib import Path

import lark
from lark import Token, Transformer, v_args

from kdsl import ast
from kdsl.errors import Diagnostic, SpecError, Span

MAX_SPEC_CHARS = 1_000_000
MAX_NESTING = 64

# ASCII spellings of Greek letters; a name spelled either way is one name.
GREEK = {
    "alpha": "α", "beta": "β", "gamma": "γ", "delta": "δ", "epsilon": "ε", "zeta": "ζ",
    "eta": "η", "theta": "θ", "iota": "ι", "kappa": "κ", "lambda": "λ", "mu": "μ",
    "nu": "ν", "xi": "ξ", "pi": "π", "rho": "ρ", "sigma": "σ", "tau": "τ",
    "upsilon": "υ", "phi": "φ", "chi": "χ", "psi": "ψ", "omega": "ω",
}

# Human words for the grammar's terminals, used in "expected ..." messages.
TERMINAL_WORDS = {
    "NAME": "a name", "NUMBER": "a number", "STRING": "a string", "EVAL": "'eval'",
    "E_OPEN": "'E['", "SAMPLE": "'~'", "ARROW": "'→'", "COMMA": "','", "PARALLEL": "'‖'",
    "COMPARE": "a comparison", "POWER": "'^'", "TIMES": "'·'", "DIVIDE": "'/'",
    "PLUS": "'+'", "MINUS": "'-'", "LPAR": "'('", "RPAR": "')'", "LSQB": "'['",
    "RSQB": "']'", "EQUAL": "'='", "$END": "the end of the spec",
}

CANONICAL_OPERATORS = {
    "·": "*", "×": "*", "⋅": "*", "*": "*", "/": "/", "+": "+", "-": "-", "−": "-",
    "^": "^", "**": "^", "≤": "<=", "<=": "<=", "≥": ">=", ">=": ">=", "<": "<",
    ">": ">", "==": "==",
}


def canonical_name(text: str) -> str:
    """Return the one spelling of a name: NFKC look-alikes folded (ϕ→φ, ϵ→ε), ASCII Greek to letters."""
    folded = unicodedata.normalize("NFKC", text)
    return GREEK.get(folded, folded)


@functools.lru_cache(maxsize=1)
def _parser() -> lark.Lark:
    grammar = resources.files("kdsl").joinpath("grammar/kd.lark").read_text(encoding="utf-8")
    return lark.Lark(grammar, parser="lalr", lexer="contextual", propagate_positions=True, maybe_placeholders=False)


def parse(text: str, path: str = "<string>") -> ast.Spec:
    """Parse spec text; raise `SpecError` with a positioned diagnostic on a syntax error."""
    _check_size(text, path)
    try:
        tree = _parser().parse(text)
    except lark.exceptions.UnexpectedInput as error:
        raise SpecError([_syntax_diagnostic(error, text, path)], text) from None
    statements = _Builder(path).transform(tree)
    return ast.Spec(tuple(statements.children if isinstance(statements, lark.Tree) else statements), path, text)


def parse_file(path: str | Path) -> ast.Spec:
    """Read and parse a spec file."""
    file = Path(path)
    if not file.is_file():
        from kdsl.errors import ConfigError

        raise ConfigError(f"spec file not found: {str(path)!r}; pass the path of an existing .kd file")
    return parse(file.read_text(encoding="utf-8"), str(path))


def _check_size(text: str, path: str) -> None:
    if len(text) > MAX_SPEC_CHARS:
        span = Span(path, 1, 1, 1, 2)
        raise SpecError([Diagnostic("KD001", f"spec is too long: {len(text)} characters, the maximum is {MAX_SPEC_CHARS}", span,
                                    "split the spec or remove generated text")], text)
    depth = 0
    line, column = 1, 1
    for ch in text:
        if ch in "([":
            depth += 1
            if depth > MAX_NESTING:
                span = Span(path, line, column, line, column + 1)
                raise SpecError([Diagnostic("KD002", f"expression nested too deeply: more than {MAX_NESTING} open brackets", span,
                                            "define parts of the expression as separate functions")], text)
        elif ch in ")]":
            depth = max(0, depth - 1)
        if ch == "\n":
            line, column = line + 1, 1
        else:
            column += 1


def _end_of_input_span(text: str, path: str) -> Span:
    """Point just past the last non-blank character of the text."""
    stripped = text.rstrip()
    if not stripped:
        return Span(path, 1, 1, 1, 2)
    line = stripped.count("\n") + 1
    column = len(stripped) - (stripped.rfind("\n") + 1) + 1
    return Span(path, line, column, line, column + 1)


def _describe_expected(expected) -> str:
    words = sorted({TERMINAL_WORDS.get(name, _literal_word(name)) for name in expected})
    if len(words) > 6:
        words = words[:6] + ["..."]
    return ", ".join(words)


def _literal_word(name: str) -> str:
    pattern = _parser().get_terminal(name).pattern if name in {t.name for t in _parser().terminals} else None
    if pattern is not None and pattern.type == "str":
        return repr(pattern.value)
    return name.lower()


def _syntax_diagnostic(error: lark.exceptions.UnexpectedInput, text: str, path: str) -> Diagnostic:
    if isinstance(error, lark.exceptions.UnexpectedCharacters):
        char = text[error.pos_in_stream] if error.pos_in_stream < len(text) else ""
        span = Span(path, error.line, error.column, error.line, error.column + 1)
        hint = "strings use double quotes; names use letters, digits, '_' and '.'"
        if char in "{}":
            hint = "use parentheses ( ) for grouping"
        return Diagnostic("KD010", f"unexpected character {char!r}", span, hint)
    if isinstance(error, lark.exceptions.UnexpectedToken) and error.token.type != "$END":
        token = error.token
        length = max(1, len(str(token)))
        span = Span(path, token.line, token.column, token.line, token.column + length)
        expected = _describe_expected(_acceptable(error))
        hint = _token_hint(token, error.expected)
        return Diagnostic("KD011", f"unexpected {_token_word(token)}; expected {expected}", span, hint)
    expected = _describe_expected(_acceptable(error))
    span = _end_of_input_span(text, path)
    message = "unexpected end of the spec" + (f"; expected {expected}" if expected else "")
    return Diagnostic("KD012", message, span, "finish the statement or close the open bracket")


def _acceptable(error: lark.exceptions.UnexpectedInput) -> set[str]:
    """Return the terminals the parser accepts at the error, exactly where lark can tell."""
    interactive = getattr(error, "interactive_parser", None)
    if interactive is not None:
        try:
            return set(interactive.accepts())
        except Exception:  # lark cannot always replay the state; fall back to its lookahead set
            pass
    return set(getattr(error, "expected", None) or [])


def _token_word(token: Token) -> str:
    if token.type == "NAME":
        return f"name {str(token)!r}"
    if token.type == "NUMBER":
        return f"number {str(token)}"
    if token.type == "STRING":
        return f"string {str(token)}"
    return repr(str(token))


def _token_hint(token: Token, expected) -> str | None:
    if token.type in ("NAME", "NUMBER", "STRING", "E_OPEN") and "TIMES" in expected:
        return "two terms side by side need an operator between them, such as '·' or '+'; a new statement starts with 'name ='"
    if token.type == "EQUAL":
        return "'=' starts a statement: the left side must be a name or 'name(parameters)'"
    if "RPAR" in expected or "RSQB" in expected:
        return "a bracket is not closed"
    return None


def _span(path: str, meta_or_token) -> Span:
    return Span(path, meta_or_token.line, meta_or_token.column, meta_or_token.end_line, meta_or_token.end_column)


class _Builder(Transformer):
    """Turn lark's parse tree into `kdsl.ast` nodes with spans."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def _name(self, token: Token) -> ast.Name:
        return ast.Name(canonical_name(str(token)), str(token), _span(self.path, token))

    def _merge(self, first: Span, last: Span) -> Span:
        return Span(self.path, first.line, first.column, last.end_line, last.end_column)

    def start(self, children):
        return list(children)

    def number(self, children):
        token = children[0]
        return ast.Number(float(token), str(token), _span(self.path, token))

    def string(self, children):
        token = children[0]
        return ast.String(str(token)[1:-1], _span(self.path, token))

    def name(self, children):
        return self._name(children[0])

    def parameter(self, children):
        return self._name(children[0])

    @v_args(meta=True)
    def assignment(self, meta, children):
        target, value = children
        return ast.Assignment(self._name(target), value, _span(self.path, meta))

    @v_args(meta=True)
    def definition(self, meta, children):
        name, *params, body = children
        return ast.Definition(self._name(name), tuple(params), body, _span(self.path, meta))

    @v_args(meta=True)
    def eval_line(self, meta, children):
        items = tuple(child for child in children if isinstance(child, ast.EvalItem))
        return ast.EvalLine(items, _span(self.path, meta))

    @v_args(meta=True)
    def eval_item(self, meta, children):
        name, *args = children
        return ast.EvalItem(self._name(name), tuple(args), _span(self.path, meta))

    @v_args(meta=True)
    def binary(self, meta, children):
        left, op, right = children
        return ast.BinaryOp(CANONICAL_OPERATORS[str(op)], left, right, _span(self.path, meta))

    @v_args(meta=True)
    def compare(self, meta, children):
        left, op, right = children
        return ast.Compare(CANONICAL_OPERATORS[str(op)], left, right, _span(self.path, meta))

    @v_args(meta=True)
    def negate(self, meta, children):
        return ast.Negate(children[1], _span(self.path, meta))

    def positive(self, children):
        return children[1]

    @v_args(meta=True)
    def expectation(self, meta, children):
        opener, variable, _sample, distribution, body = children
        head = Span(self.path, opener.line, opener.column, distribution.span.end_line, distribution.span.end_column + 1)
        return ast.Expectation(self._name(variable), distribution, body, _span(self.path, meta), head)

    @v_args(meta=True)
    def subscript(self, meta, children):
        base, *items = children
        return ast.Subscript(base, tuple(items), _span(self.path, meta))

    @v_args(meta=True)
    def call(self, meta, children):
        func, *rest = children
        args = tuple(child for child in rest if not isinstance(child, Token))
        separators = tuple("‖" if child.type == "PARALLEL" else "," for child in rest if isinstance(child, Token))
        return ast.Call(func, args, separators, _span(self.path, meta))

    @v_args(meta=True)
    def project(self, meta, children):
        source, _arrow, target = children
        return ast.Project(source, self._name(target), _span(self.path, meta))

    @v_args(meta=True)
    def keyword_item(self, meta, children):
        name, value = children
        return ast.Keyword(self._name(name), value, _span(self.path, meta))

    def positional_item(self, children):
        return children[0]

    keyword_argument = keyword_item

    def positional_argument(self, children):
        return children[0]
