"""Parse `.kd` text into the syntax tree of `kdsl.ast`.

The grammar lives in `grammar/kd.lark` (LALR). Lark's exceptions are turned
into kdsl diagnostics here, so its internal terminal names never reach the
user. Parsing also enforces the limits that keep hostile input cheap: the
size of the text, the nesting depth of expressions and the range of numeric
literals.
"""

from __future__ import annotations

import functools
import math
import unicodedata
from importlib import resources
from pathlib import Path

import lark
from lark import Token, Transformer, v_args

from kdsl import ast
from kdsl.errors import ConfigError, Diagnostic, SpecError, Span

MAX_SPEC_CHARS = 100_000
# Deepest nesting of the parse tree: brackets, calls and operator chains all
# count, so `1 + 1 + ... + 1` with more than this many terms is rejected too.
MAX_NESTING = 200
MAX_NUMBER_CHARS = 40
MAX_NUMBER = 1e300

# ASCII spellings of Greek letters; a name spelled either way is one name.
GREEK = {
    "alpha": "α", "beta": "β", "gamma": "γ", "delta": "δ", "epsilon": "ε", "zeta": "ζ",
    "eta": "η", "theta": "θ", "iota": "ι", "kappa": "κ", "lambda": "λ", "mu": "μ",
    "nu": "ν", "xi": "ξ", "pi": "π", "rho": "ρ", "sigma": "σ", "tau": "τ",
    "upsilon": "υ", "phi": "φ", "chi": "χ", "psi": "ψ", "omega": "ω",
    "Gamma": "Γ", "Delta": "Δ", "Theta": "Θ", "Lambda": "Λ", "Xi": "Ξ", "Pi": "Π",
    "Sigma": "Σ", "Upsilon": "Υ", "Phi": "Φ", "Psi": "Ψ", "Omega": "Ω",
}
# Other ASCII spellings of one-letter operators of the language.
ASCII_SPELLINGS = {"sum": "Σ"}
ASCII_OF = {letter: word for word, letter in {**GREEK, **ASCII_SPELLINGS}.items()}

# Human words for the grammar's terminals, used in "expected ..." messages.
TERMINAL_WORDS = {
    "NAME": "a name", "NUMBER": "a number", "STRING": "a string", "EVAL": "'eval'",
    "E_OPEN": "'E['", "SAMPLE": "'~'", "ARROW": "'→'", "COMMA": "','", "PARALLEL": "'‖'",
    "COMPARE": "a comparison", "POWER": "'^'", "TIMES": "'·'", "DIVIDE": "'/'",
    "PLUS": "'+'", "MINUS": "'-'", "LPAR": "'('", "RPAR": "')'", "LSQB": "'['",
    "RSQB": "']'", "EQUAL": "'='", "$END": "the end of the spec",
}
CONTROL_NAMES = {"\x00": "NULL", "\x1b": "ESCAPE", "\x7f": "DELETE", "\x08": "BACKSPACE"}
EXPRESSION_STARTS = {"NAME", "NUMBER", "STRING", "E_OPEN", "LPAR", "MINUS", "PLUS"}
OPERATORS = {"PLUS", "MINUS", "TIMES", "DIVIDE", "POWER", "COMPARE", "ARROW"}

CANONICAL_OPERATORS = {
    "·": "*", "×": "*", "⋅": "*", "*": "*", "/": "/", "+": "+", "-": "-", "−": "-",
    "^": "^", "**": "^", "≤": "<=", "<=": "<=", "≥": ">=", ">=": ">=", "<": "<",
    ">": ">", "==": "==",
}


def canonical_name(text: str) -> str:
    """Return the one spelling of a name.

    Compatibility look-alikes are folded by Unicode NFKC (ϕ→φ, ϵ→ε, µ→μ, 𝜆→λ,
    fullwidth letters to ASCII). ASCII Greek words become letters, both as a
    whole name (`lambda` → `λ`) and as parts between underscores (`alpha_kd`
    → `α_kd`); `sum` becomes `Σ`. Dotted names are settings and keep their
    ASCII spelling.
    """
    folded = unicodedata.normalize("NFKC", text)
    if "." in folded:
        return folded
    if folded in ASCII_SPELLINGS:
        return ASCII_SPELLINGS[folded]
    return "_".join(GREEK.get(part, part) for part in folded.split("_"))


@functools.lru_cache(maxsize=1)
def _parser() -> lark.Lark:
    grammar = resources.files("kdsl").joinpath("grammar/kd.lark").read_text(encoding="utf-8")
    return lark.Lark(grammar, parser="lalr", lexer="contextual", propagate_positions=True, maybe_placeholders=False)


def parse(text: str, path: str = "<string>") -> ast.Spec:
    """Parse spec text; raise `SpecError` with a positioned diagnostic on a syntax error."""
    text = text.removeprefix("\ufeff")  # a byte-order mark written by some editors is not part of the spec
    _check_size(text, path)
    try:
        tree = _parser().parse(text)
    except lark.exceptions.UnexpectedInput as error:
        raise SpecError([_syntax_diagnostic(error, text, path)], text) from None
    _check_depth(tree, text, path)
    builder = _Builder(path)
    statements = builder.transform(tree)
    if builder.diagnostics:
        raise SpecError(builder.diagnostics, text)
    return ast.Spec(tuple(statements), path, text)


def parse_file(path: str | Path) -> ast.Spec:
    """Read and parse a spec file (UTF-8)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"spec file not found: {str(path)!r}; pass the path of an existing .kd file")
    data = file.read_bytes()
    return parse(decode(data, str(path)), str(path))


def decode(data: bytes, path: str) -> str:
    """Decode spec bytes as UTF-8; an invalid byte is a positioned error (KD004)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        good = data[: error.start].decode("utf-8")
        line = good.count("\n") + 1
        column = len(good) - (good.rfind("\n") + 1) + 1
        shown = data[: error.start].decode("utf-8") + "\ufffd" + data[error.end:].decode("utf-8", errors="replace")
        diagnostic = Diagnostic("KD004", f"the spec is not valid UTF-8: byte 0x{data[error.start]:02x} cannot start a character here",
                                Span(path, line, column, line, column + 1), "save the file as UTF-8")
        raise SpecError([diagnostic], shown) from None


def _check_size(text: str, path: str) -> None:
    if len(text) > MAX_SPEC_CHARS:
        span = Span(path, 1, 1, 1, 2)
        raise SpecError([Diagnostic("KD001", f"the spec is too long: {len(text)} characters, the maximum is {MAX_SPEC_CHARS}",
                                    span, "split the spec or remove generated text")], text)


def _check_depth(tree: lark.Tree, text: str, path: str) -> None:
    """Reject parse trees nested deeper than MAX_NESTING, walking the tree without recursion."""
    stack = [(tree, -2)]  # the root and a statement are not expression levels
    while stack:
        node, depth = stack.pop()
        if depth > MAX_NESTING:
            span = _tree_span(node, path)
            raise SpecError([Diagnostic("KD002", f"the expression is nested too deeply: more than {MAX_NESTING} levels "
                                        "of brackets, calls or operators", span,
                                        "define parts of the expression as separate functions")], text)
        for child in node.children:
            if isinstance(child, lark.Tree):
                stack.append((child, depth + 1))


def _tree_span(node: lark.Tree, path: str) -> Span:
    meta = node.meta
    if not getattr(meta, "empty", True):
        return Span(path, meta.line, meta.column, meta.line, meta.column + 1)
    return Span(path, 1, 1, 1, 2)


# --- syntax errors ------------------------------------------------------------------------


def _syntax_diagnostic(error: lark.exceptions.UnexpectedInput, text: str, path: str) -> Diagnostic:
    if isinstance(error, lark.exceptions.UnexpectedCharacters):
        return _character_diagnostic(error, text, path)
    tokens = _tokens_before(text, error)
    expected = _acceptable(error)
    at_end = not isinstance(error, lark.exceptions.UnexpectedToken) or error.token.type == "$END"
    stray = _stray_name(tokens, expected)
    if stray is not None:
        return stray_name_diagnostic(stray, path, at_end)
    if not at_end:
        token = error.token
        span = Span(path, token.line, token.column, token.line, token.column + max(1, len(str(token))))
        message = f"unexpected {_token_word(token)}; expected {describe_expected(expected)}"
        return Diagnostic("KD011", message, span, _token_hint(token, expected))
    span = _end_of_input_span(text, tokens, path)
    message = "unexpected end of the spec" + (f"; expected {describe_expected(expected)}" if expected else "")
    return Diagnostic("KD012", message, span, _end_hint(text, tokens))


def _character_diagnostic(error: lark.exceptions.UnexpectedCharacters, text: str, path: str) -> Diagnostic:
    char = text[error.pos_in_stream] if error.pos_in_stream < len(text) else ""
    span = Span(path, error.line, error.column, error.line, error.column + 1)
    hint = "names use letters, digits, '_' and '.'; strings use double quotes; comments start with '#'"
    if char in "{}":
        hint = "use parentheses ( ) for grouping"
    elif char in "\"'":
        hint = "a string ends on the line where it starts, with the same quote"
    elif char == ";":
        hint = "statements need no separator: start the next statement on its own line"
    elif char == "!":
        hint = "there is no '!' operator; compare with <=, >=, <, > or =="
    elif char.isdigit():
        hint = "a name cannot start with a digit"
    elif unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp"):
        hint = f"remove the invisible character {CONTROL_NAMES.get(char) or unicodedata.name(char, 'U+%04X' % ord(char))}"
    return Diagnostic("KD010", f"unexpected character {char!r} (U+{ord(char):04X})" if char else "unexpected character", span, hint)


def _tokens_before(text: str, error) -> list[Token]:
    """Return the tokens before the error position (comments and blanks skipped)."""
    limit = error.pos_in_stream if getattr(error, "pos_in_stream", None) is not None else len(text)
    if isinstance(error, lark.exceptions.UnexpectedToken) and error.token.type == "$END":
        limit = len(text)
    tokens = []
    try:
        for token in _parser().lex(text[:limit]):
            tokens.append(token)
    except lark.exceptions.LarkError:
        pass
    return tokens


def _stray_name(tokens: list[Token], expected: set[str]) -> Token | None:
    """Return a name that starts a statement but is neither assigned nor defined (`... KL(o‖q) CE`)."""
    if not tokens or tokens[-1].type != "NAME" or not expected or not expected <= {"LPAR", "EQUAL"}:
        return None
    if len(tokens) >= 2 and tokens[-2].type in ("RPAR", "RSQB", "NAME", "NUMBER", "STRING"):
        return tokens[-1]
    return None


def stray_name_diagnostic(token: Token, path: str, at_end: bool) -> Diagnostic:
    span = Span(path, token.line, token.column, token.line, token.column + len(str(token)))
    return Diagnostic(
        "KD013", f"{str(token)!r} does not continue the expression before it and does not start a statement",
        span, f"join it with an operator, as in '+ {token}' or '· {token}', or start a statement: '{token} = ...'",
    )


def _end_of_input_span(text: str, tokens: list[Token], path: str) -> Span:
    """Point just past the last token, or at the first column of an empty spec."""
    if tokens:
        last = tokens[-1]
        return Span(path, last.end_line, last.end_column, last.end_line, last.end_column + 1)
    stripped = text.rstrip()
    if not stripped:
        return Span(path, 1, 1, 1, 2)
    line = stripped.count("\n") + 1
    column = len(stripped) - (stripped.rfind("\n") + 1) + 1
    return Span(path, line, column, line, column + 1)


def _end_hint(text: str, tokens: list[Token]) -> str:
    depth = 0
    for token in tokens:
        if token.type in ("LPAR", "LSQB", "E_OPEN"):
            depth += 1
        elif token.type in ("RPAR", "RSQB"):
            depth -= 1
    if depth > 0:
        return f"{depth} bracket{'s are' if depth > 1 else ' is'} still open: close {'them' if depth > 1 else 'it'}"
    if tokens and tokens[-1].type in OPERATORS | {"EQUAL", "SAMPLE", "COMMA", "PARALLEL"}:
        return f"an expression must follow {str(tokens[-1])!r}"
    return "finish the statement"


def describe_expected(expected: set[str]) -> str:
    """Turn a set of grammar terminals into words: "an expression", "an operator", "')'"."""
    remaining = set(expected)
    words = []
    if {"NAME", "NUMBER", "LPAR"} <= remaining:
        words.append("an expression")
        remaining -= EXPRESSION_STARTS
    if {"TIMES", "DIVIDE"} <= remaining:
        words.append("an operator")
        remaining -= OPERATORS
    if {"NAME", "$END"} <= remaining:
        words.append("a new statement")
        remaining -= {"NAME", "EVAL"}
    words += sorted(TERMINAL_WORDS.get(name, name.lower()) for name in remaining if name != "$END")
    if "$END" in remaining:
        words.append(TERMINAL_WORDS["$END"])
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " or " + words[-1]


def _acceptable(error: lark.exceptions.UnexpectedInput) -> set[str]:
    """Return the terminals the parser accepts at the error, exactly where lark can tell."""
    interactive = getattr(error, "interactive_parser", None)
    if interactive is not None:
        try:
            return set(interactive.accepts())
        except lark.exceptions.LarkError:  # lark cannot always replay the state; use its lookahead set
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


def _token_hint(token: Token, expected: set[str]) -> str:
    if token.type in ("NAME", "NUMBER", "STRING", "E_OPEN", "LPAR") and "TIMES" in expected:
        return "two terms side by side need an operator between them, such as '·' or '+'"
    if token.type == "EQUAL":
        return "'=' starts a statement: the left side must be a name or 'name(parameters)'"
    if token.type == "PARALLEL":
        return "'‖' separates the two arguments of a divergence, as in KL(o ‖ q)"
    if token.type == "SAMPLE":
        return "'~' belongs in E[w ~ D]"
    if token.type in ("RPAR", "RSQB") and not expected & {"RPAR", "RSQB"}:
        return f"this {str(token)!r} closes no open bracket: remove it"
    if expected and expected <= {"LPAR", "EQUAL"}:
        return "a statement is 'name = value' or 'name(parameters) = body': write '=' after the name"
    if "RPAR" in expected or "RSQB" in expected:
        return "a bracket is not closed"
    return "a statement is 'name = value', 'name(parameters) = body' or 'eval metric, ...'"


# --- building the syntax tree -------------------------------------------------------------


def number_problem(text: str) -> str | None:
    """Return why a numeric literal is rejected, or None when it is a finite float64 value."""
    if len(text) > MAX_NUMBER_CHARS:
        return f"the number has {len(text)} characters, the maximum is {MAX_NUMBER_CHARS}"
    value = float(text)
    if not math.isfinite(value) or value > MAX_NUMBER:
        return f"the number {text} is too large: the maximum is 1e300"
    if value == 0 and any(ch in "123456789" for ch in text.lower().split("e")[0]):
        return f"the number {text} is too small: it rounds to 0 in float64"
    return None


def _span(path: str, meta_or_token) -> Span:
    return Span(path, meta_or_token.line, meta_or_token.column, meta_or_token.end_line, meta_or_token.end_column)


class _Builder(Transformer):
    """Turn lark's parse tree into `kdsl.ast` nodes with spans; collect literal errors."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.diagnostics: list[Diagnostic] = []

    def _name(self, token: Token) -> ast.Name:
        return ast.Name(canonical_name(str(token)), str(token), _span(self.path, token))

    def start(self, children):
        return list(children)

    def number(self, children):
        token = children[0]
        span = _span(self.path, token)
        problem = number_problem(str(token))
        if problem is not None:
            self.diagnostics.append(Diagnostic("KD003", problem, span, "write a number between 1e-300 and 1e300"))
            return ast.Number(0.0, "0", span)
        return ast.Number(float(token), str(token), span)

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
