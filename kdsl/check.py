"""Semantic validation: turn a parsed spec into a typed, validated `Objective`.

The checker evaluates each expression of the spec to a typed value: a scalar
(a sympy expression over role symbols), a distribution, a loss or a sampling
source, each a linear combination of atoms with scalar coefficients. It
collects every error it finds and raises them together, sorted by position.

Diagnostic codes, each listed with an example in docs/language.md:
  KD00x: limits of the input (raised by `kdsl.parse`).
  KD01x: syntax (raised by `kdsl.parse`).
  KD10x-KD11x: names, settings and definitions.
  KD12x: types of expressions.
  KD13x: distributions, divergences and their parameters.
  KD14x: weights, mixtures and schedules.
  KD15x: evaluation lines and warnings about the objective as a whole.
"""

from __future__ import annotations

import difflib
import math
import unicodedata
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sympy

from kdsl import algebra, ast
from kdsl import objective as obj
from kdsl.errors import Diagnostic, SpecError, Span
from kdsl.parse import ASCII_OF, MAX_NUMBER
from kdsl.printing import (  # noqa: F401 - re-exported for the CLI and kdsl.explain
    canonical_hash, describe_dist, describe_divergence, describe_source, format_objective,
)
from kdsl.settings import SETTINGS, nearest_setting

DIVERGENCES = {"KL", "JS", "TV", "SKL", "SRKL", "Df", "H", "ULD"}
PARAMETRISED = {"JS", "SKL", "SRKL", "Df"}
MODELS = {"o", "q"}
SOURCES = {"d_data", "d_o", "d_q"}
ROLE_NAMES = {"t", "T", "w", "epoch", "step", "progress"}
SUM = "Σ"
RESERVED = (DIVERGENCES | MODELS | SOURCES | {"CE", "adaptive", "w_t", "ref", "objective", "E", SUM, "true", "false"}
            | set(algebra.MATH_FUNCTIONS) | set(algebra.MATH_CONSTANTS))
ROLE_SYMBOLS = {"t": obj.POSITION, "T": obj.LENGTH, "epoch": obj.EPOCH, "step": obj.STEP, "progress": obj.PROGRESS}
ADAPTIVE_KEYWORDS = {"init_prob", "max_prob", "step", "threshold", "replay_capacity", "replay_ratio", "fresh_schedule"}
EVAL_METRICS = {"ce", "kl", "rouge_l", "exposure_bias", "bpc"}
MAX_DEFINITION_DEPTH = 32  # definitions that call definitions, deepest chain
MAX_EXPONENT = 1000  # largest constant exponent of a symbolic base
# Settings that only matter when the objective uses a construct.
SETTING_USERS = {
    "sgo.": "generated source (d_q or d_o)",
    "adaptive.": "adaptive(...) source",
    "mixture.": "mixture of sources",
    "js.": "JS[β]",
    "rho.": "sequence weight ρ(w)",
    "projection.": "projection o→q or q→o",
    "ref": "reference model ref(w)",
}
# Letters of other scripts that look like ASCII letters; NFKC does not fold them.
CONFUSABLES = {
    "а": "a", "е": "e", "о": "o", "р": "p", "с": "c", "у": "y", "х": "x", "ԛ": "q", "ѕ": "s", "і": "i",
    "А": "A", "В": "B", "Е": "E", "К": "K", "М": "M", "Н": "H", "О": "O", "Р": "P", "С": "C", "Т": "T", "Х": "X",
    "ο": "o", "Ο": "O", "Α": "A", "Β": "B", "Ε": "E", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N",
    "Ρ": "P", "Τ": "T", "Χ": "X", "Ζ": "Z",
}


class _W:
    """The sampled sequence variable `w` (only valid as an argument: o(w), λ(t, w))."""

    def __init__(self, span: Span):
        self.span = span


@dataclass
class _Lin:
    """A linear combination Σ coefficient·atom of one kind: "dist", "loss" or "source"."""

    kind: str
    items: list[tuple[sympy.Expr, Any, Any]] = field(default_factory=list)  # (coefficient, atom, source)
    span: Span | None = None

    def scaled(self, factor: sympy.Expr, span: Span) -> "_Lin":
        return _Lin(self.kind, [(factor * c, atom, src) for c, atom, src in self.items], span)


@dataclass
class _Function:
    definition: ast.Definition
    kind: str | None = None
    body: sympy.Expr | None = None
    used: bool = False


class Checker:
    """Validate one spec. Use `check()`; this class keeps the state of one run."""

    def __init__(self, spec: ast.Spec, overrides: dict[str, Any] | None, same_vocab: bool | None):
        self.spec = spec
        self.overrides = overrides or {}
        self.same_vocab = same_vocab
        self.diagnostics: list[Diagnostic] = []
        self.settings: dict[str, Any] = {name: s.default for name, s in SETTINGS.items()}
        self.settings_written: dict[str, Span | None] = {}
        self.settings_read: set[str] = set()
        self.functions: dict[str, _Function] = {}
        self.objective_node: ast.Assignment | None = None
        self.eval_lines: list[ast.EvalLine] = []
        self.evaluating: list[str] = []
        self.uses: set[str] = set()
        self.current: Span | None = None  # the statement being checked, for the recursion fallback

    # --- diagnostics ---------------------------------------------------------------

    def error(self, code: str, message: str, span: Span | None, hint: str | None = None) -> None:
        self.diagnostics.append(Diagnostic(code, message, span, hint))

    def warn(self, code: str, message: str, span: Span | None, hint: str | None = None) -> None:
        self.diagnostics.append(Diagnostic(code, message, span, hint, severity="warning"))

    # --- entry point ---------------------------------------------------------------

    def run(self) -> obj.Objective:
        try:
            terms, groups, evals = self.check_all()
        except RecursionError:
            self.error("KD002", "the spec is too deeply nested to check", self.current,
                       "define parts of the expression as separate functions")
            terms, groups, evals = [], [], []
        diagnostics = _unique(self.diagnostics)
        if any(d.severity == "error" for d in diagnostics):
            raise SpecError(diagnostics, self.spec.text)
        return obj.Objective(
            terms=terms,
            groups=groups,
            settings=dict(self.settings),
            definitions=self.definitions(),
            evals=evals,
            reduction=self.settings["reduction"],
            warnings=sorted(diagnostics, key=Diagnostic.sort_key),
            path=self.spec.path,
            source_text=self.spec.text,
            syntax=self.spec,
        )

    def check_all(self):
        self.collect_statements()
        self.resolve_settings()
        self.check_definitions()
        terms, groups = self.check_objective()
        evals = self.check_evals()
        if terms:
            self.warn_about_objective(terms)
        self.warn_unused_settings()
        return terms, groups, evals

    def definitions(self) -> dict[str, obj.FunctionDef]:
        return {
            name: obj.FunctionDef(name, tuple(p.id for p in f.definition.params), f.body, f.kind or "constant", f.definition.span)
            for name, f in self.functions.items()
            if f.body is not None
        }

    # --- statements and settings ---------------------------------------------------

    def collect_statements(self) -> None:
        for statement in self.spec.statements:
            if isinstance(statement, ast.EvalLine):
                self.eval_lines.append(statement)
            elif isinstance(statement, ast.Definition):
                self.add_function(statement.name, statement)
            elif statement.target.id == "objective":
                if self.objective_node is not None:
                    self.error("KD105", "the objective is defined twice", statement.target.span,
                               f"keep one 'objective = ...' line; the first is at line {self.objective_node.span.line}")
                else:
                    self.objective_node = statement
            elif statement.target.id in SETTINGS:
                self.assign_setting(statement)
            elif "." in statement.target.id:
                near = nearest_setting(statement.target.id)
                self.error("KD102", f"unknown setting {statement.target.text!r}", statement.target.span,
                           f"did you mean {near!r}?" if near else "run 'kdsl settings' to list the known settings")
            else:
                definition = ast.Definition(statement.target, (), statement.value, statement.span)
                self.add_function(statement.target, definition)
        if self.objective_node is None:
            end = self.spec.text.rstrip().count("\n") + 1
            self.error("KD106", "the spec has no objective", Span(self.spec.path, end, 1, end, 2),
                       "add a line such as 'objective = KL(o ‖ q)'")

    def add_function(self, name: ast.Name, definition: ast.Definition) -> None:
        if name.id in RESERVED or name.id in ROLE_NAMES:
            self.error("KD103", f"{name.text!r} is a name of the language and cannot be redefined", name.span,
                       f"choose another name, such as '{name.text}_1'")
            return
        if name.id in self.functions:
            first = self.functions[name.id].definition.span.line
            self.error("KD104", f"{name.text!r} is defined twice", name.span, f"the first definition is at line {first}")
            return
        seen = set()
        for param in definition.params:
            if param.id in seen:
                self.error("KD107", f"parameter {param.text!r} appears twice in {name.text}(...)", param.span,
                           "give each parameter its own name")
            seen.add(param.id)
        self.functions[name.id] = _Function(definition)

    def assign_setting(self, statement: ast.Assignment) -> None:
        name = statement.target.id
        if name in self.settings_written:
            self.error("KD108", f"setting {name!r} is assigned twice", statement.target.span,
                       f"the first assignment is at line {self.settings_written[name].line}")
            return
        value = self.literal(statement.value)
        if value is None:
            return
        converted = self.convert_setting(name, value, statement.value.span)
        if converted is not None:
            self.settings[name] = converted
            self.settings_written[name] = statement.target.span

    def literal(self, node: ast.Expr):
        if isinstance(node, ast.String):
            return node.value
        if isinstance(node, ast.Number):
            return algebra.number(node.text)
        if isinstance(node, ast.Negate) and isinstance(node.operand, ast.Number):
            return -algebra.number(node.operand.text)
        if isinstance(node, ast.Name) and node.id in ("true", "false"):
            return node.id == "true"
        self.error("KD109", "a setting takes a literal value", node.span,
                   "write a number, a quoted string, true or false")
        return None

    def convert_setting(self, name: str, value, span: Span | None):
        setting = SETTINGS[name]
        if setting.kind is bool:
            if isinstance(value, bool):
                return value
            self.error("KD114", f"setting {name!r} takes true or false, got {_show(value)}", span, f"write {name} = true")
            return None
        if setting.kind is str:
            if not isinstance(value, str):
                self.error("KD114", f"setting {name!r} takes a quoted string, got {_show(value)}", span,
                           f'write {name} = "{_show(value)}"')
                return None
            if setting.choices and value not in setting.choices:
                near = difflib.get_close_matches(value, setting.choices, n=1)
                hint = f"did you mean {near[0]!r}?" if near else f"use {setting.describe_range()}"
                self.error("KD114", f"invalid value {value!r} for {name!r}: expected {setting.describe_range()}", span, hint)
                return None
            return value
        if isinstance(value, (str, bool)):
            self.error("KD114", f"setting {name!r} takes a number, got {value!r}", span, f"write {name} = {setting.default}")
            return None
        number = sympy.Rational(value)
        if setting.kind is int:
            if not number.is_integer or abs(number) > 2**62:
                self.error("KD114", f"setting {name!r} takes a whole number below 2^62, got {_show(number)}", span,
                           f"write {name} = {setting.default}")
                return None
            converted = int(number)
        else:
            converted = float(number)
        if (setting.minimum is not None and converted < setting.minimum) or (
            setting.maximum is not None and converted > setting.maximum
        ):
            self.error("KD114", f"value {converted:g} of {name!r} is out of range: expected {setting.describe_range()}", span,
                       f"{setting.help}")
            return None
        return converted

    def resolve_settings(self) -> None:
        for name, raw in self.overrides.items():
            if name not in SETTINGS:
                near = nearest_setting(name)
                self.error("KD102", f"unknown setting {name!r} in the overrides", None,
                           f"did you mean {near!r}?" if near else "run 'kdsl settings' to list the known settings")
                continue
            value = parse_override(SETTINGS[name], raw)
            converted = self.convert_setting(name, value, None)
            if converted is not None:
                self.settings[name] = converted
                self.settings_written.setdefault(name, None)

    # --- definitions ---------------------------------------------------------------

    def check_definitions(self) -> None:
        for name in list(self.functions):
            self.current = self.functions[name].definition.span
            self.function_body(name)
        for name, function in self.functions.items():
            if function.body is None:
                continue
            definition = function.definition
            used_symbols = function.body.free_symbols
            for param in definition.params:
                symbol = ROLE_SYMBOLS.get(param.id)
                if param.id == "w":
                    if not (used_symbols & (obj.SEQUENCE_ROLES | {obj.LOG_O_TOKEN, obj.LOG_Q_TOKEN})):
                        self.warn("KD112", f"parameter 'w' of {definition.name.text} is not used", param.span,
                                  f"remove it, or use it as o(w_t), q(w), ref(w)")
                elif param.id == "t" and used_symbols & {obj.LOG_O_TOKEN, obj.LOG_Q_TOKEN}:
                    continue  # o(w_t) and q(w_t) depend on the position t
                elif symbol is not None and symbol not in used_symbols:
                    self.warn("KD112", f"parameter {param.text!r} of {definition.name.text} is not used", param.span,
                              "remove it")

    def function_body(self, name: str) -> sympy.Expr | None:
        """Evaluate a definition's body once with its parameters bound to their role symbols."""
        function = self.functions[name]
        if function.body is not None or function.kind in ("invalid", "value"):
            return function.body

        definition = function.definition
        if name in self.evaluating:
            cycle = " → ".join(self.evaluating[self.evaluating.index(name):] + [name])
            self.error("KD111", f"definitions refer to each other in a cycle: {cycle}", definition.name.span,
                       "a definition may use only definitions that do not use it back")
            function.kind = "invalid"
            return None
        if len(self.evaluating) >= MAX_DEFINITION_DEPTH:
            self.error("KD111", f"definitions call each other more than {MAX_DEFINITION_DEPTH} levels deep",
                       definition.name.span, "inline some of the definitions")
            function.kind = "invalid"
            return None

        self.evaluating.append(name)
        scope = {}
        for param in definition.params:
            if param.id in ROLE_SYMBOLS:
                scope[param.id] = ROLE_SYMBOLS[param.id]
            elif param.id == "w":
                scope["w"] = _W(param.span)
            else:
                scope[param.id] = sympy.Dummy(param.id, positive=True)
        value = self.evaluate(definition.body, scope, context=name)
        self.evaluating.pop()

        if value is None:
            function.kind = "invalid"
            return None
        if not isinstance(value, sympy.Expr):
            if len(definition.params) == 0 and isinstance(value, _Lin):
                # A named distribution, loss or source (`mix = 0.5·d_q + 0.5·d_data`) is inlined where used.
                function.kind = "value"
                return None
            self.error("KD121", f"the body of {definition.name.text} must be a number-valued expression, not a {describe(value)}",
                       definition.body.span, "define losses in the objective; definitions hold weights and schedules")
            function.kind = "invalid"
            return None

        # Products of exponentials are merged, under powers too, so that ratios such as ref(w)/q(w) and
        # (ref(w)/q(w))^(1/T) are one exp of a difference of logs.
        value = sympy.powsimp(value, combine="exp", deep=True)
        function.body = value
        function.kind = classify(value)
        return value

    # --- expressions -----------------------------------------------------------------

    def evaluate(self, node: ast.Expr, scope: dict, context: str | None = None):
        """Evaluate an expression to a sympy scalar, a `_Lin`, a `_W` or None after an error."""
        method = getattr(self, "eval_" + type(node).__name__.lower())
        return method(node, scope, context)

    def eval_number(self, node: ast.Number, scope, context):
        return algebra.number(node.text)

    def eval_string(self, node: ast.String, scope, context):
        self.error("KD120", "a string cannot appear in an expression", node.span, "strings are only values of settings")
        return None

    def eval_name(self, node: ast.Name, scope, context):
        name = node.id
        if name in scope:
            return scope[name]
        if name in ROLE_SYMBOLS or name == "w":
            if context is None:
                return ROLE_SYMBOLS[name] if name in ROLE_SYMBOLS else _W(node.span)
            params = ", ".join([p.text for p in self.functions[context].definition.params] + [node.text])
            self.error("KD110", f"{node.text!r} is used in the body of {context} but is not one of its parameters", node.span,
                       f"add it: {context}({params})")
            return None
        if name in MODELS:
            return _Lin("dist", [(sympy.Integer(1), obj.ModelDist(name, span=node.span), None)], node.span)
        if name in SOURCES:
            atom = {"d_data": obj.DataSource, "d_o": obj.TeacherSource, "d_q": obj.StudentSource}[name](span=node.span)
            return _Lin("source", [(sympy.Integer(1), atom, None)], node.span)
        if name == "CE":
            if context is not None:
                self.error("KD121", f"CE is a loss; losses belong in the objective, not in the definition of {context}", node.span,
                           "weight the loss in the objective, as in λ(t, w) · CE")
                return None
            return _Lin("loss", [(sympy.Integer(1), obj.Divergence("CE", span=node.span), None)], node.span)
        if name in algebra.MATH_CONSTANTS:
            return algebra.MATH_CONSTANTS[name]
        if name in SETTINGS:
            return self.setting_value(node)
        if name in self.functions:
            return self.function_value(node)
        return self.misplaced_name(node, scope)

    def function_value(self, node: ast.Name):
        function = self.functions[node.id]
        function.used = True
        if function.definition.params:
            self.error("KD113", f"{node.text} takes {_count(len(function.definition.params), 'argument')}", node.span,
                       f"call it: {node.text}({', '.join(p.text for p in function.definition.params)})")
            return None
        body = self.function_body(node.id)
        if function.kind == "value":
            # A named distribution, loss or source is inlined where it is used.
            return self.evaluate(function.definition.body, {}, context=None)
        return body

    def misplaced_name(self, node: ast.Name, scope):
        name = node.id
        if name in DIVERGENCES:
            self.error("KD122", f"{name} needs arguments", node.span, f"write {name}(o ‖ q)")
        elif name in ("true", "false"):
            self.error("KD120", f"{name} is a value for settings, not for expressions", node.span,
                       "use 1 or 0, or where(condition, a, b)")
        elif name == "w_t":
            self.error("KD123", "'w_t' is the token at position t, not a number", node.span,
                       "use it as an argument, as in o(w_t) or q(w_t)")
        elif name == SUM:
            self.error("KD122", f"{node.text} needs an expression to sum over positions", node.span,
                       f"write {node.text}(log(q(w_t)))")
        elif name in ("adaptive", "ref") or name in algebra.MATH_FUNCTIONS:
            self.error("KD122", f"{node.text} is a function and needs arguments", node.span,
                       "write adaptive(d_q, d_data)" if name == "adaptive" else f"write {node.text}(...)")
        elif name == "E":
            self.error("KD122", "E is the expectation and needs brackets", node.span, "write E[w ~ d_q] KL(o ‖ q)")
        else:
            hint = self.suggest(node.text, name, scope) or f"define it first, as in '{node.text} = 0.5'"
            self.error("KD101", f"unknown name {node.text!r}", node.span, hint)
        return None

    def setting_value(self, node: ast.Name):
        self.settings_read.add(node.id)
        value = self.settings[node.id]
        if isinstance(value, str):
            self.error("KD120", f"setting {node.id!r} is a string and cannot appear in arithmetic", node.span,
                       "use a numeric setting such as train.epochs, or a number")
            return None
        return algebra.constant(value)

    def suggest(self, text: str, name: str, scope: dict, function: bool = False) -> str | None:
        """Return a hint with the known name nearest to an unknown one, spelled the way the user spells names.

        For a called name (`function=True`) only names that can be called are suggested.
        """
        lookalike = _confusable_hint(text)
        if function:
            known = DIVERGENCES | MODELS | {"adaptive", "ref", SUM} | set(algebra.MATH_FUNCTIONS) | set(self.functions)
        else:
            known = set(RESERVED) | set(ROLE_NAMES) | set(self.functions) | set(scope) | set(SETTINGS)
            known -= {"objective"}
        spellings: dict[str, str] = {}
        for candidate in sorted(known):
            spellings[candidate] = candidate
            if candidate in ASCII_OF:
                spellings.setdefault(ASCII_OF[candidate], candidate)
        near = difflib.get_close_matches(text, sorted(spellings), n=1, cutoff=0.6)
        if not near:
            near = difflib.get_close_matches(name, sorted(spellings), n=1, cutoff=0.6)
        if not near:
            lowered = {k.lower(): k for k in spellings}
            if text.lower() in lowered:
                near = [lowered[text.lower()]]
        suggestion = f"did you mean {near[0]!r}?" if near else None
        if lookalike and suggestion:
            return f"{lookalike}; {suggestion}"
        return lookalike or suggestion

    def eval_negate(self, node: ast.Negate, scope, context):
        value = self.evaluate(node.operand, scope, context)
        if value is None:
            return None
        if isinstance(value, _Lin):
            return value.scaled(sympy.Integer(-1), node.span)
        if isinstance(value, _W):
            return self.misuse_w(value)
        if not isinstance(value, sympy.Expr):
            self.error("KD120", "a comparison cannot be negated", node.span, "use where(condition, a, b)")
            return None
        return -value

    def misuse_w(self, value: _W):
        self.error("KD123", "'w' is the sampled sequence, not a number", value.span,
                   "use it as an argument, as in o(w), ρ(w) or λ(t, w)")
        return None

    def eval_binaryop(self, node: ast.BinaryOp, scope, context):
        left = self.evaluate(node.left, scope, context)
        right = self.evaluate(node.right, scope, context)
        if left is None or right is None:
            return None

        if isinstance(left, _W):
            return self.misuse_w(left)
        if isinstance(right, _W):
            return self.misuse_w(right)
        for value, side in ((left, node.left), (right, node.right)):
            if isinstance(value, sympy.logic.boolalg.Boolean) and not isinstance(value, sympy.Expr):
                self.error("KD120", "a comparison is not a number", side.span, "use it as a condition: where(t <= 64, 1, 0)")
                return None

        left_lin, right_lin = isinstance(left, _Lin), isinstance(right, _Lin)
        if not left_lin and not right_lin:
            return self.arithmetic(node, left, right)

        if node.op in ("+", "-"):
            return self.add_linear(node, left, right)
        if node.op == "*":
            if left_lin and right_lin:
                self.error("KD125", f"cannot multiply {describe(left)} by {describe(right)}", node.span,
                           "an objective is a weighted sum of losses; weights are number-valued")
                return None
            lin, factor = (left, right) if left_lin else (right, left)
            return lin.scaled(factor, node.span)
        if node.op == "/":
            if right_lin:
                self.error("KD125", f"cannot divide by {describe(right)}", node.span,
                           "divide by a number, as in KL(o ‖ q) / 2")
                return None
            if right == 0:
                self.error("KD003", "division by zero", node.right.span, "divide by a non-zero number")
                return None
            return left.scaled(1 / right, node.span)
        self.error("KD125", f"cannot raise {describe(left if left_lin else right)} to a power", node.span,
                   "powers apply to numbers, as in τ^2 · KL(o[τ=2] ‖ q[τ=2])")
        return None

    def arithmetic(self, node: ast.BinaryOp, left: sympy.Expr, right: sympy.Expr):
        op = node.op
        if op == "/" and right == 0:
            self.error("KD003", "division by zero", node.right.span, "divide by a non-zero number")
            return None
        if op == "^" and not self.power_allowed(node, left, right):
            return None
        result = {"+": sympy.Add, "-": lambda a, b: a - b, "*": sympy.Mul, "/": lambda a, b: a / b, "^": sympy.Pow}[op](left, right)
        return self.finite_real(result, node.span, "this expression")

    def finite_real(self, value: sympy.Expr, span: Span, what: str):
        """Return `value` if it can be a finite real number; report KD003 otherwise."""
        if value.has(sympy.zoo, sympy.oo, -sympy.oo, sympy.nan):
            self.error("KD003", f"{what} has no finite value: {_show(value)}", span,
                       "check divisions by zero and logarithms of zero")
            return None
        if value.is_number and value.is_real is False:
            self.error("KD003", f"{what} is not a real number: {_show(value)}", span,
                       "square roots and logarithms need non-negative arguments")
            return None
        if value.is_number and abs(value) > MAX_NUMBER:
            self.error("KD003", f"{what} is out of the float64 range", span, "write a number between 1e-300 and 1e300")
            return None
        return value

    def power_allowed(self, node: ast.BinaryOp, base: sympy.Expr, exponent: sympy.Expr) -> bool:
        """Reject powers whose exact value would be astronomically large (10^10^10) before sympy computes them."""
        if exponent.free_symbols or not exponent.is_number:
            return True
        if base.is_number and not base.free_symbols:
            magnitude = algebra.finite_float(sympy.Abs(base))
            power = algebra.finite_float(exponent)
            if magnitude is None or power is None:
                return True
            if magnitude == 0 and power < 0:
                self.error("KD003", "division by zero: 0 raised to a negative power", node.span, "raise 0 only to positive powers")
                return False
            if magnitude > 0 and abs(math.log10(magnitude) * power) > 300:
                self.error("KD003", "the value of this power is out of the float64 range", node.span,
                           "write a number between 1e-300 and 1e300")
                return False
            return True
        if abs(float(exponent)) > MAX_EXPONENT:
            self.error("KD003", f"the exponent {_show(exponent)} is too large: at most {MAX_EXPONENT} for an expression with variables",
                       node.right.span, "write the power with exp and log, as in exp(k·log(x))")
            return False
        return True

    def add_linear(self, node: ast.BinaryOp, left, right):
        op = node.op
        if isinstance(left, _Lin) and isinstance(right, _Lin) and left.kind == right.kind:
            if op == "-" and left.kind != "loss":
                self.error("KD124", f"cannot subtract one {describe(right)} from another", node.span,
                           "a mixture is a weighted sum with non-negative coefficients")
                return None
            other = right if op == "+" else right.scaled(sympy.Integer(-1), node.span)
            return _Lin(left.kind, left.items + other.items, node.span)
        self.error("KD124", f"cannot {'add' if op == '+' else 'subtract'} {describe(left)} and {describe(right)}", node.span,
                   _add_hint(left, right))
        return None

    def eval_compare(self, node: ast.Compare, scope, context):
        left = self.evaluate(node.left, scope, context)
        right = self.evaluate(node.right, scope, context)
        if left is None or right is None:
            return None
        if not isinstance(left, sympy.Expr) or not isinstance(right, sympy.Expr):
            self.error("KD120", "comparisons take number-valued expressions", node.span, "compare numbers, as in t <= 64")
            return None
        return {"<": sympy.StrictLessThan, "<=": sympy.LessThan, ">": sympy.StrictGreaterThan,
                ">=": sympy.GreaterThan, "==": sympy.Eq}[node.op](left, right)

    def eval_keyword(self, node: ast.Keyword, scope, context):
        self.error("KD120", f"keyword argument {node.name.text}= is not allowed here", node.span,
                   "keyword options belong to o[τ=2], o[top_k=64] and adaptive(d_q, d_data, init_prob=0.1)")
        return None

    def eval_project(self, node: ast.Project, scope, context):
        source = node.source
        if not (isinstance(source, ast.Name) and source.id in MODELS) or node.target.id not in MODELS or node.target.id == source.id:
            self.error("KD131", "invalid projection: only o→q and q→o exist", node.span,
                       "write o→q for the teacher in the student's vocabulary, or q→o for the student in the teacher's")
            return None
        self.uses.add("projection.")
        atom = obj.ProjectedDist(source.id, span=node.span)
        return _Lin("dist", [(sympy.Integer(1), atom, None)], node.span)

    def eval_expectation(self, node: ast.Expectation, scope, context):
        if context is not None:
            self.error("KD126", "E[...] belongs in the objective, not in a definition", node.head_span,
                       "define the weight without E and write E[w ~ D] in the objective")
            return None
        if node.variable.id != "w":
            self.error("KD127", f"E[...] samples the sequence w, not {node.variable.text!r}", node.variable.span,
                       "write E[w ~ D]")
            return None

        distribution = self.evaluate(node.distribution, scope, context)
        body = self.evaluate(node.body, scope, context)
        if distribution is None or body is None:
            return None
        if not (isinstance(distribution, _Lin) and distribution.kind == "source"):
            self.error("KD127", f"E[w ~ D] samples from a distribution over sequences, got {describe(distribution)}",
                       node.distribution.span, "use d_data, d_o, d_q, a mixture such as 0.5·d_q + 0.5·d_data, or adaptive(d_q, d_data)")
            return None
        if not (isinstance(body, _Lin) and body.kind == "loss"):
            self.error("KD128", f"the body of E[...] must be a loss, got {describe(body)}", node.body.span,
                       "write a loss such as KL(o ‖ q) after E[w ~ D]")
            return None

        source = self.make_source(distribution, node.distribution.span)
        if source is None:
            return None
        items = []
        for coefficient, atom, inner in body.items:
            if inner is not None:
                self.error("KD126", "expectations cannot be nested", node.head_span,
                           "write each expectation as its own term: E[w ~ d_q] KL(o ‖ q) + E[w ~ d_data] CE")
                return None
            items.append((coefficient, atom, source))
        return _Lin("loss", items, node.span)

    def eval_subscript(self, node: ast.Subscript, scope, context):
        base = node.base
        if isinstance(base, ast.Name) and base.id in MODELS:
            return self.model_options(node, base)
        if isinstance(base, ast.Project):
            return self.projection_options(node, scope, context)
        if isinstance(base, ast.Name) and base.id in PARAMETRISED:
            self.error("KD122", f"{base.text}[...] needs arguments", node.span, f"write {base.text}[...](o ‖ q)")
            return None
        self.error("KD120", "brackets [...] are not allowed after this expression", node.span,
                   "brackets follow o or q (o[τ=2], o[top_k=64]) or a parametrised divergence (JS[0.5](o ‖ q))")
        return None

    def model_options(self, node: ast.Subscript, base: ast.Name):
        temperature, top_k = None, None
        for item in node.items:
            if not isinstance(item, ast.Keyword) or item.name.id not in ("τ", "temperature", "top_k"):
                near = None
                if isinstance(item, ast.Keyword):
                    near = difflib.get_close_matches(item.name.text, ["tau", "temperature", "top_k"], n=1)
                self.error("KD132", f"unknown option for {base.text}", item.span,
                           f"did you mean {near[0]!r}?" if near else "write o[τ=2] or o[top_k=64]")
                return None
            value = self.evaluate(item.value, {}, None)
            if value is None:
                return None
            if not isinstance(value, sympy.Expr):
                self.error("KD132", f"{item.name.text} takes a number, got {describe(value)}", item.value.span,
                           "write o[τ=2] or o[top_k=64]")
                return None
            if item.name.id == "top_k":
                if value.free_symbols or not value.is_integer or value < 1 or value > 2**31:
                    self.error("KD132", f"top_k must be a whole number from 1 to 2^31, got {_show(value)}", item.value.span,
                               "write o[top_k=64]")
                    return None
                top_k = int(value)
            else:
                if not self.check_positive(value, item.value.span, "temperature τ"):
                    return None
                temperature = obj.Scalar(value, item.value.span)
        atom = obj.ModelDist(base.id, temperature=temperature, top_k=top_k, span=node.span)
        return _Lin("dist", [(sympy.Integer(1), atom, None)], node.span)

    def projection_options(self, node: ast.Subscript, scope, context):
        """`o→q[τ=2]`: a temperature on the projected logits; a projection takes no other option."""
        projected = self.evaluate(node.base, scope, context)
        if projected is None:
            return None
        (_, atom, _), = projected.items
        temperature = None
        for item in node.items:
            if not isinstance(item, ast.Keyword) or item.name.id not in ("τ", "temperature"):
                self.error("KD132", f"unknown option for {atom.source}→{atom.target}", item.span,
                           f"a projection takes only a temperature: write {atom.source}→{atom.target}[τ=2]")
                return None
            if temperature is not None:
                self.error("KD132", "the temperature of a projection is given twice", item.span,
                           f"write one τ, as in {atom.source}→{atom.target}[τ=2]")
                return None
            value = self.evaluate(item.value, {}, None)
            if value is None:
                return None
            if not isinstance(value, sympy.Expr):
                self.error("KD132", f"{item.name.text} takes a number, got {describe(value)}", item.value.span,
                           f"write {atom.source}→{atom.target}[τ=2]")
                return None
            if not self.check_positive(value, item.value.span, "temperature τ"):
                return None
            temperature = obj.Scalar(value, item.value.span)
        atom = obj.ProjectedDist(atom.source, temperature=temperature, span=node.span)
        return _Lin("dist", [(sympy.Integer(1), atom, None)], node.span)

    def projected_cross_entropy(self, node: ast.Call, scope, context):
        """`CE(o→q)`: the cross-entropy of the projected teacher against the student's labels."""
        if context is not None:
            self.error("KD121", f"CE is a loss; losses belong in the objective, not in the definition of {context}", node.span,
                       "weight the loss in the objective, as in λ(t, w) · CE(o→q)")
            return None
        args = self.positional(node, scope, context)
        if args is None:
            return None
        if len(args) != 1:
            self.error("KD122", f"CE takes no argument or one projection, got {len(args)} arguments", node.span,
                       "write CE for the student, or CE(o→q) for the teacher projected into the student's vocabulary")
            return None
        (value,) = args
        atom = None
        if isinstance(value, _Lin) and value.kind == "dist" and len(value.items) == 1:
            coefficient, atom, _ = value.items[0]
            if coefficient != 1:
                atom = None
        if not isinstance(atom, obj.ProjectedDist) or atom.source != "o":
            self.error("KD122", f"CE takes only the projection o→q as its argument, got {describe(value)}", node.args[0].span,
                       "write CE for the student's cross-entropy, or CE(o→q) to train the projection on the labels")
            return None
        return _Lin("loss", [(sympy.Integer(1), obj.Divergence("CE", args=(atom,), span=node.span), None)], node.span)

    def check_positive(self, value: sympy.Expr, span: Span, what: str) -> bool:
        if value.free_symbols - obj.SCHEDULE_ROLES:
            self.error("KD140", f"{what} must be a constant or a schedule of epoch, step or progress", span,
                       "per-token quantities cannot set a temperature")
            return False
        ranges = algebra.domain(self.settings)
        low, _ = algebra.bounds(value, ranges)
        if low > 0:
            return True
        proved, point = algebra.find_negative(value - sympy.Rational(1, 10**9), ranges)
        if point is not None:
            self.error("KD140", f"{what} must be positive, but it is {point['value'] + 1e-9:g}{_where(point)}", span,
                       "write a value above 0, such as τ=2")
            return False
        if not proved:
            self.warn("KD140", f"could not prove that {what} = {_show(value)} stays positive; it was positive at every probed point",
                      span, "bound it, e.g. with max(…, 0.1)")
        return True

    def eval_call(self, node: ast.Call, scope, context):
        func = node.func
        if isinstance(func, ast.Subscript) and isinstance(func.base, ast.Name) and func.base.id in PARAMETRISED:
            return self.divergence(func.base.id, node, func.items, scope, context)
        if not isinstance(func, ast.Name):
            self.error("KD120", "only names can be called", func.span, "call a function by name, as in λ(t, w)")
            return None

        name = func.id
        if name in PARAMETRISED:
            hint = {"JS": "write JS[0.5](o ‖ q)", "SKL": "write SKL[0.1](o ‖ q)", "SRKL": "write SRKL[0.1](o ‖ q)",
                    "Df": "define f(x) = ... and write Df[f](o ‖ q)"}[name]
            self.error("KD133", f"{name} needs its parameter in brackets", func.span, hint)
            return None

        if name in DIVERGENCES:
            return self.divergence(name, node, (), scope, context)
        if name in MODELS or name == "ref":
            return self.token_probability(node, scope, context)
        if name == "adaptive":
            return self.adaptive(node, scope, context)
        if name == SUM:
            return self.position_sum(node, scope, context)
        if name in algebra.MATH_FUNCTIONS:
            return self.math_call(node, scope, context)
        if name in self.functions:
            return self.user_call(node, scope, context)
        if name == "CE":
            return self.projected_cross_entropy(node, scope, context)
        if name in SOURCES or name in ROLE_NAMES or name in SETTINGS:
            self.error("KD120", f"{func.text} is not a function", func.span, f"write {func.text} without arguments")
            return None
        hint = self.suggest(func.text, name, scope, function=True) or f"define it first, as in '{func.text}(t) = 1 - t/100'"
        self.error("KD101", f"unknown function {func.text!r}", func.span, hint)
        return None

    def positional(self, node: ast.Call, scope, context) -> list | None:
        values = []
        for arg in node.args:
            if isinstance(arg, ast.Keyword):
                self.error("KD122", f"unexpected keyword argument {arg.name.text}=", arg.span,
                           "pass the value by position")
                return None
            value = self.evaluate(arg, scope, context)
            if value is None:
                return None
            values.append(value)
        return values

    def math_call(self, node: ast.Call, scope, context):
        func, arity = algebra.MATH_FUNCTIONS[node.func.id]
        args = self.positional(node, scope, context)
        if args is None:
            return None
        if (arity is not None and len(args) != arity) or (arity is None and len(args) < 2):
            expected = f"{arity}" if arity is not None else "at least 2"
            self.error("KD113", f"{node.func.text} takes {expected} {'argument' if arity == 1 else 'arguments'}, got {len(args)}", node.span,
                       _math_example(node.func.text, arity))
            return None
        is_where = node.func.id == "where"
        for index, (arg, arg_node) in enumerate(zip(args, node.args)):
            if is_where and index == 0:
                if not isinstance(arg, sympy.logic.boolalg.Boolean) or isinstance(arg, sympy.Expr):
                    self.error("KD120", "the first argument of where must be a comparison", arg_node.span,
                               "write where(t <= 64, 1, 0)")
                    return None
            elif not isinstance(arg, sympy.Expr):
                self.error("KD120", f"{node.func.text} takes number-valued arguments, got {describe(arg)}", arg_node.span,
                           "math functions apply to weights and schedules, not to distributions or losses")
                return None
        result = func(*args)
        if isinstance(result, sympy.Expr):
            return self.finite_real(result, node.span, f"{node.func.text}(...)")
        return result

    def position_sum(self, node: ast.Call, scope, context):
        """Σ(expr): the sum of a per-position expression over the positions t = 1..T of the response."""
        if len(node.args) != 1 or isinstance(node.args[0], ast.Keyword):
            self.error("KD113", f"{node.func.text} takes one expression, got {_count(len(node.args), 'argument')}", node.span,
                       f"write {node.func.text}(log(q(w_t)))")
            return None
        inner = dict(scope)
        inner["t"] = obj.POSITION
        value = self.evaluate(node.args[0], inner, context)
        if value is None:
            return None
        if not isinstance(value, sympy.Expr):
            self.error("KD145", f"{node.func.text} sums number-valued expressions, got {describe(value)}", node.args[0].span,
                       "a sum of losses over positions is what the reduction does; write the loss without Σ")
            return None
        if value.free_symbols & (obj.SEQUENCE_ROLES - {obj.LENGTH}):
            self.error("KD145", f"{node.func.text} sums per-position quantities, but this expression uses o(w), q(w) or ref(w) "
                       "of the whole sequence", node.args[0].span, "take sequence probabilities outside the sum")
            return None
        result, problem = algebra.sum_over_positions(value)
        if result is None:
            self.error("KD145", problem, node.args[0].span, "Σ supports log o(w_t), log q(w_t) and closed-form sums over t")
            return None
        return result

    def token_probability(self, node: ast.Call, scope, context):
        name = node.func.id
        if len(node.args) != 1 or not isinstance(node.args[0], ast.Name) or node.args[0].id not in ("w_t", "w"):
            self.error("KD122", f"{node.func.text}(...) takes w_t (the token at position t) or w (the whole sequence)", node.span,
                       f"write {node.func.text}(w_t) or {node.func.text}(w)")
            return None
        arg = node.args[0]
        if context is not None and "w" not in scope:
            params = ", ".join([p.text for p in self.functions[context].definition.params] + ["w"])
            self.error("KD110", f"{name}({arg.text}) depends on the sampled sequence w, which is not a parameter of {context}",
                       arg.span, f"add it: {context}({params})")
            return None
        if name == "ref":
            if arg.id != "w":
                self.error("KD122", "ref takes the whole sequence: ref(w)", node.span, "write ref(w)")
                return None
            if not self.settings.get("ref"):
                self.error("KD134", "ref(w) needs a reference model", node.span, 'set ref = "path or builtin name"')
                return None
            self.uses.add("ref")
            self.uses.add("rho.")
            return sympy.exp(obj.LOG_REF_SEQ)
        if arg.id == "w_t":
            if "t" not in scope and context is not None:
                params = ", ".join([p.text for p in self.functions[context].definition.params] + ["t"])
                self.error("KD110", f"{name}(w_t) depends on the position t, which is not a parameter of {context}", arg.span,
                           f"add it: {context}({params})")
                return None
            return sympy.exp(obj.LOG_O_TOKEN if name == "o" else obj.LOG_Q_TOKEN)
        self.uses.add("rho.")
        return sympy.exp(obj.LOG_O_SEQ if name == "o" else obj.LOG_Q_SEQ)

    def user_call(self, node: ast.Call, scope, context):
        name = node.func.id
        function = self.functions[name]
        function.used = True
        params = function.definition.params
        if len(node.args) != len(params):
            expected = ", ".join(p.text for p in params)
            self.error("KD113", f"{node.func.text} takes {_count(len(params), 'argument')} ({expected}), got {len(node.args)}", node.span,
                       f"call it as {node.func.text}({expected})")
            return None

        if self.function_body(name) is None:
            if function.kind == "value":
                self.error("KD120", f"{node.func.text} is not a function", node.func.span, f"write {node.func.text} without arguments")
            return None
        if any(p.id not in ROLE_SYMBOLS and p.id != "w" for p in params):
            self.error("KD135", f"{node.func.text} has a parameter that is not t, T, w, epoch, step or progress; "
                       "such a function is an f-divergence generator", node.span, f"use it as Df[{node.func.text}](o ‖ q)")
            return None

        args = self.positional(node, scope, context)
        if args is None:
            return None
        inner = {}
        for param, value, arg_node in zip(params, args, node.args):
            if param.id == "w":
                if not isinstance(value, _W):
                    self.error("KD122", f"argument {param.text} of {node.func.text} must be the sampled sequence w", arg_node.span,
                               f"pass w, as in {node.func.text}({', '.join(p.text for p in params)})")
                    return None
            elif not isinstance(value, sympy.Expr):
                self.error("KD122", f"argument {param.text} of {node.func.text} must be number-valued, got {describe(value)}",
                           arg_node.span, f"pass a number or a role name, as in {node.func.text}({', '.join(p.text for p in params)})")
                return None
            inner[param.id] = value

        substitutions = {ROLE_SYMBOLS[p]: v for p, v in inner.items() if p in ROLE_SYMBOLS}
        return function.body.xreplace(substitutions) if substitutions else function.body

    def adaptive(self, node: ast.Call, scope, context):
        self.uses.add("adaptive.")
        self.uses.add("sgo.")
        sources, params = [], {}
        for arg in node.args:
            if isinstance(arg, ast.Keyword):
                if arg.name.id not in ADAPTIVE_KEYWORDS:
                    near = difflib.get_close_matches(arg.name.id, sorted(ADAPTIVE_KEYWORDS), n=1)
                    self.error("KD136", f"unknown option {arg.name.text!r} of adaptive", arg.name.span,
                               f"did you mean {near[0]!r}?" if near else "options: " + ", ".join(sorted(ADAPTIVE_KEYWORDS)))
                    return None
                value = self.literal(arg.value)
                if value is None:
                    return None
                converted = self.convert_setting(f"adaptive.{arg.name.id}", value, arg.value.span)
                if converted is None:
                    return None
                params[arg.name.id] = converted
            else:
                value = self.evaluate(arg, scope, context)
                if value is None:
                    return None
                if not (isinstance(value, _Lin) and value.kind == "source" and len(value.items) == 1):
                    self.error("KD136", f"adaptive takes two sources, got {describe(value)}", arg.span, "write adaptive(d_q, d_data)")
                    return None
                sources.append(value.items[0][1])
        if len(sources) != 2 or not isinstance(sources[0], obj.StudentSource):
            self.error("KD136", "adaptive takes the student source and a fallback: adaptive(d_q, d_data)", node.span,
                       "write adaptive(d_q, d_data)")
            return None
        resolved = {key[len("adaptive."):]: self.settings[key] for key in SETTINGS if key.startswith("adaptive.")}
        resolved.update(params)
        atom = obj.AdaptiveSource(sources[0], sources[1], tuple(sorted(resolved.items())), span=node.span)
        return _Lin("source", [(sympy.Integer(1), atom, None)], node.span)

    # --- distributions and divergences ------------------------------------------------

    def divergence(self, kind: str, node: ast.Call, items, scope, context):
        if context is not None:
            self.error("KD121", f"{kind} is a loss; losses belong in the objective, not in the definition of {context}", node.span,
                       "weight the loss in the objective, as in λ(t, w) · KL(o ‖ q)")
            return None
        param, generator = None, None
        if kind in PARAMETRISED:
            if len(items) != 1 or isinstance(items[0], ast.Keyword):
                self.error("KD133", f"{kind}[...] takes one parameter, got {len(items)}", node.func.span,
                           _divergence_example(kind))
                return None
            if kind == "Df":
                generator = self.generator(items[0])
                if generator is None:
                    return None
            else:
                param = self.divergence_parameter(kind, items[0], scope)
                if param is None:
                    return None

        args = self.positional(node, scope, context)
        if args is None:
            return None
        arity = {"H": (1, 2)}.get(kind, (2,))
        if len(args) not in arity:
            expected = " or ".join(str(a) for a in arity)
            self.error("KD113", f"{kind} takes {expected} {'distribution' if arity == (1,) else 'distributions'}, got {len(args)}", node.span,
                       _divergence_example(kind))
            return None

        dists = []
        for value, arg_node in zip(args, node.args):
            dist = self.make_dist(value, arg_node.span, kind)
            if dist is None:
                return None
            dists.append(dist)
        if not self.check_vocabularies(kind, dists, node):
            return None

        if kind == "JS":
            self.uses.add("js.")
        if kind in ("JS", "SKL", "SRKL") and not self.check_endpoint(kind, param, dists):
            return None
        atom = obj.Divergence(kind, tuple(dists), param=param, generator=generator, span=node.span)
        return _Lin("loss", [(sympy.Integer(1), atom, None)], node.span)

    def divergence_parameter(self, kind: str, item: ast.Expr, scope) -> obj.Scalar | None:
        value = self.evaluate(item, {}, None)
        if value is None:
            return None
        symbol = "β" if kind == "JS" else "α"
        if not isinstance(value, sympy.Expr) or value.free_symbols - obj.SCHEDULE_ROLES:
            self.error("KD137", f"{symbol} of {kind} must be a constant or a schedule of epoch, step or progress", item.span,
                       f"write {kind}[0.5](o ‖ q) or define {symbol}(progress) = ...")
            return None
        proved, point = algebra.in_unit_interval(value, algebra.domain(self.settings))
        if point is not None:
            self.error("KD137", f"{symbol} of {kind} must lie in [0, 1], got {point['value']:g}{_where(point)}",
                       item.span, f"{symbol} is a mixture weight, so it is a probability")
            return None
        if not proved:
            self.error("KD137", f"could not prove that {symbol} = {_show(value)} of {kind} lies in [0, 1]", item.span,
                       "bound it with clip(..., 0, 1)")
            return None
        return obj.Scalar(value, item.span)

    def check_endpoint(self, kind: str, param: obj.Scalar, dists) -> bool:
        """Apply the endpoint policy: JS[0], JS[1] and SKL[1], SRKL[1] are identically 0."""
        a, b = (describe_dist(d) for d in dists)
        endpoints = (0, 1) if kind == "JS" else (1,)
        reached = self.reached_endpoints(param.expr, endpoints)
        if not reached:
            return True
        value, where = reached[0]
        if kind == "JS":
            meant = f"KL({a} ‖ {b})" if value == 0 else f"KL({b} ‖ {a})"
            message = (f"JS[β] is identically 0 at β = {value}{where} (its mixture equals one argument); "
                       f"TRL's GKD switches to {meant} at this endpoint, kdsl keeps the continuous value 0")
            fix = f"write {meant}, or a β strictly between 0 and 1"
        else:
            meant = f"KL({a} ‖ {b})" if kind == "SKL" else f"KL({b} ‖ {a})"
            message = f"{kind}[α] is identically 0 at α = 1{where}: its mixture equals one argument"
            fix = f"use α < 1; α = 0 gives {meant}"
        if kind == "JS" and self.settings["js.endpoint"] == "error":
            self.error("KD138", message, param.span, fix)
            return False
        self.warn("KD138", message, param.span, fix if kind != "JS" else f"{fix}; js.endpoint = \"error\" rejects this")
        return True

    def reached_endpoints(self, expr: sympy.Expr, endpoints) -> list[tuple[int, str]]:
        if not expr.free_symbols:
            return [(int(expr), "")] if expr in endpoints else []
        symbols = sorted(expr.free_symbols, key=lambda s: s.name)
        points = algebra.probe_points(symbols, algebra.domain(self.settings))
        values = algebra.evaluate_numeric(expr, points)
        found = []
        for endpoint in endpoints:
            hits = np.flatnonzero(np.abs(values - endpoint) < 1e-12)
            if hits.size:
                point = {symbol: float(points[symbol][hits[0]]) for symbol in symbols}
                found.append((endpoint, f" (reached at {algebra.format_point(point)})"))
        return found

    def generator(self, item: ast.Expr) -> sympy.Lambda | None:
        if not isinstance(item, ast.Name) or item.id not in self.functions:
            near = None
            if isinstance(item, ast.Name):
                near = self.suggest(item.text, item.id, {})
            self.error("KD139", "Df[f] takes the name of a function of one variable", item.span,
                       near if near and isinstance(item, ast.Name) and item.id not in RESERVED
                       else "define it first, e.g. f(x) = x·log(x), then write Df[f](o ‖ q)")
            return None
        function = self.functions[item.id]
        function.used = True
        params = function.definition.params
        if len(params) != 1 or params[0].id in ROLE_SYMBOLS or params[0].id == "w":
            self.error("KD139", f"{item.text} must take exactly one variable that is not a role name (t, T, w, epoch, ...)",
                       item.span, "define it as f(x) = ...")
            return None
        body = self.function_body(item.id)
        if body is None:
            return None
        variable = next(iter(s for s in body.free_symbols if isinstance(s, sympy.Dummy)), None)
        if body.free_symbols - ({variable} if variable is not None else set()):
            self.error("KD139", f"generator {item.text} may depend only on its variable", item.span,
                       "a generator is a fixed function f(x); schedules and weights go outside Df")
            return None
        x = variable if variable is not None else sympy.Dummy(params[0].id, positive=True)
        if not self.generator_is_valid(item, body, x):
            return None
        return sympy.Lambda(x, body)

    def generator_is_valid(self, item: ast.Name, body: sympy.Expr, x: sympy.Symbol) -> bool:
        """Check f(1) = 0 and convexity on (0, ∞) of an f-divergence generator."""
        name = item.text
        at_one = body.subs(x, 1)
        if not algebra.is_zero(at_one):
            shown = _show(sympy.nsimplify(at_one) if at_one.is_number else at_one)
            self.error("KD139", f"generator {name} must satisfy f(1) = 0, but f(1) = {shown}", item.span,
                       f"subtract the constant: {name}(x) = ... - ({shown})")
            return False

        second = sympy.diff(body, x, 2)
        smooth = algebra.unsupported_node(second) is None
        if smooth and (second.is_nonnegative or algebra.bounds(second, {x: (1e-300, math.inf)})[0] >= 0):
            return True

        xs = np.logspace(-6, 6, 241)
        if smooth:
            values = algebra.evaluate_numeric(second, {x: xs})
            bad = np.flatnonzero(values < -1e-12)
            shown = f"f''(x) = {_show(second)} is negative"
        else:
            # f is not twice differentiable (abs, min, max, where): test convexity on each triple of neighbouring points.
            values = algebra.evaluate_numeric(body, {x: xs})
            chord = values[:-2] + (values[2:] - values[:-2]) * (xs[1:-1] - xs[:-2]) / (xs[2:] - xs[:-2])
            bad = np.flatnonzero(values[1:-1] > chord + 1e-9 * (1 + np.abs(chord))) + 1
            shown = "f lies above its chord"

        if bad.size:
            self.error("KD139", f"generator {name} is not convex on (0, ∞): {shown} at x = {xs[bad[0]]:g}",
                       item.span, "an f-divergence needs a convex f, such as x·log(x) (KL) or (x - 1)^2 (χ²)")
            return False
        if smooth:
            self.warn("KD139", f"could not prove generator {name} convex; f''(x) = {_show(second)} was non-negative at 241 points "
                      "in [1e-6, 1e6]", item.span, "check the generator by hand")
        return True

    def make_dist(self, value, span: Span, kind: str):
        if not (isinstance(value, _Lin) and value.kind == "dist"):
            self.error("KD129", f"{kind} compares distributions, got {describe(value)}", span,
                       "use o, q, o[τ=2], o→q, or a mixture such as 0.5·o + 0.5·q")
            return None
        if len(value.items) == 1 and value.items[0][0] == 1:
            return value.items[0][1]
        vocabularies = {atom.vocab for _, atom, _ in value.items}
        if len(vocabularies) > 1 and self.same_vocab is False:
            self.error("KD130", "a mixture combines distributions over different vocabularies: the teacher and student "
                       "tokenizers differ", span, "project one side first, as in 0.5·o→q + 0.5·q")
            return None
        components = self.mixture_components(value, span, "coefficient", "α·o + (1 - α)·q")
        if components is None:
            return None
        return obj.MixtureDist(tuple(components), span=span)

    def mixture_components(self, value: _Lin, span: Span, word: str, example: str):
        """Check that mixture coefficients are constants or schedules in [0, 1] that sum to 1."""
        ranges = algebra.domain(self.settings)
        plural = "probabilities" if word == "probability" else f"{word}s"
        total = sympy.Integer(0)
        components = []
        for coefficient, atom, _ in value.items:
            if coefficient.free_symbols - obj.SCHEDULE_ROLES:
                self.error("KD141", f"mixture {plural} must be constants or schedules of epoch, step or progress, "
                           f"got {_show(coefficient)}", span, "per-token quantities cannot weight a mixture")
                return None
            proved, point = algebra.in_unit_interval(coefficient, ranges)
            if point is not None:
                self.error("KD141", f"mixture {word} {_show(coefficient)} must lie in [0, 1], "
                           f"got {point['value']:g}{_where(point)}", span, f"write a convex mixture such as {example}")
                return None
            if not proved:
                self.error("KD141", f"could not prove that the mixture {word} {_show(coefficient)} lies in [0, 1]", span,
                           "bound it with clip(..., 0, 1) or min/max")
                return None
            components.append((obj.Scalar(coefficient), atom))
            total += coefficient
        if not algebra.is_zero(total - 1, ranges):
            self.error("KD141", f"mixture {plural} must sum to 1, but they sum to {_show(sympy.simplify(total))}", span,
                       f"write the last {word} as 1 minus the others, e.g. {example}")
            return None
        return components

    def check_vocabularies(self, kind: str, dists, node: ast.Call) -> bool:
        if len(dists) < 2 or kind == "ULD" or self.same_vocab is not False:
            return True
        first, second = dists[0].vocab, dists[1].vocab
        if first == second:
            return True
        a, b = describe_dist(dists[0]), describe_dist(dists[1])
        fix = f"{kind}(o→q ‖ q)" if dists[0].vocab == "teacher" else f"{kind}(q→o ‖ o)"
        self.error("KD130", f"{kind}({a} ‖ {b}) compares a distribution over the {first} vocabulary with one over the "
                   f"{second} vocabulary, but the teacher and student tokenizers differ", node.span,
                   f"project one side into the other's vocabulary, e.g. {fix}, or use ULD({a}, {b})")
        return False

    def make_source(self, value: _Lin, span: Span):
        if len(value.items) == 1 and value.items[0][0] == 1:
            return value.items[0][1]
        components = self.mixture_components(value, span, "probability", "α·d_q + (1 - α)·d_data")
        if components is None:
            return None
        self.uses.add("mixture.")
        return obj.MixtureSource(tuple(components), per=self.settings["mixture.per"], span=span)

    # --- the objective -----------------------------------------------------------------

    def check_objective(self):
        node = self.objective_node
        if node is None:
            return [], []
        self.current = node.span
        value = self.evaluate(node.value, {}, None)
        if value is None:
            return [], []
        if not (isinstance(value, _Lin) and value.kind == "loss"):
            hint = "did you mean KL(o ‖ q)?" if isinstance(value, _Lin) and value.kind == "dist" else "write a loss such as KL(o ‖ q) or CE"
            self.error("KD128", f"the objective must be a loss, got {describe(value)}", node.value.span, hint)
            return [], []

        groups: list = []
        terms = []
        names_seen: dict[str, int] = {}
        for coefficient, divergence, source in value.items:
            source = source if source is not None else obj.DataSource()
            if source not in groups:
                groups.append(source)
            group = groups.index(source)
            if divergence.kind == "CE" and not obj.source_has_labels(source):
                self.error("KD142", f"CE needs ground-truth labels, but {describe_source(source)} samples the student's own outputs",
                           divergence.span, "take CE under d_data (a term outside E[...]) or under d_o")
                continue
            if source_uses(source, (obj.StudentSource, obj.TeacherSource)):
                self.uses.add("sgo.")
            term = self.make_term(coefficient, divergence, group, names_seen)
            if term is not None:
                terms.append(term)

        used = sorted({t.group for t in terms})
        if used != list(range(len(groups))):
            # Groups whose terms were all rejected are dropped and the others renumbered.
            mapping = {old: new for new, old in enumerate(used)}
            groups = [groups[old] for old in used]
            terms = [obj.Term(t.name, t.loss, t.coefficient, t.token_weight, t.sequence_weight, mapping[t.group], t.span)
                     for t in terms]
        return terms, groups

    def make_term(self, coefficient: sympy.Expr, divergence: obj.Divergence, group: int, names_seen) -> obj.Term | None:
        schedule, token, sequence = [], [], []
        for factor in sympy.Mul.make_args(coefficient):
            kind = classify(factor)
            if kind == "token":
                token.append(factor)
            elif kind == "sequence":
                sequence.append(factor)
            else:
                schedule.append(factor)
        span = divergence.span
        # deep=True also merges exponentials under a power: (ref(w)/q(w))^(1/T) becomes exp((log ref - log q)/T).
        parts = {
            "weight": sympy.Mul(*schedule),
            "per-token weight": sympy.powsimp(sympy.Mul(*token), combine="exp", deep=True),
            "sequence weight": sympy.powsimp(sympy.Mul(*sequence), combine="exp", deep=True),
        }
        if not self.weights_valid(parts, divergence, span):
            return None
        name = describe_divergence(divergence)
        if name in names_seen:
            names_seen[name] += 1
            name = f"{name}#{names_seen[name]}"
        else:
            names_seen[name] = 1
        token_weight = obj.Scalar(parts["per-token weight"]) if token else None
        sequence_weight = obj.Scalar(parts["sequence weight"]) if sequence else None
        return obj.Term(name, divergence, obj.Scalar(parts["weight"]), token_weight, sequence_weight, group, span)

    def weights_valid(self, parts: dict, divergence: obj.Divergence, span: Span) -> bool:
        """Check that each weight of a term is finite and non-negative (a negative entropy weight is allowed)."""
        ranges = algebra.domain(self.settings)
        loss = describe_divergence(divergence)
        for label, expr in parts.items():
            if not expr.free_symbols and algebra.finite_float(expr) is None:
                self.error("KD003", f"the {label} of {loss} is not a finite number: {_show(expr)}", span,
                           "write a weight between 1e-300 and 1e300")
                return False
            if label == "weight" and divergence.kind == "H" and len(divergence.args) == 1:
                continue  # -c·H(q) is a standard entropy bonus
            proved, point = algebra.find_negative(expr, ranges)
            if point is not None:
                self.error("KD143", _negative_message(label, loss, expr, point), span, _negative_hint(label, expr, ranges))
                return False
            if not proved and expr.free_symbols:
                self.warn("KD144", f"could not prove the {label} {_show(expr)} of {loss} non-negative; "
                          "it was non-negative at every probed point", span,
                          "bound it with max(..., 0) if it can become negative")
        return True

    # --- eval lines and warnings -----------------------------------------------------------

    def check_evals(self) -> list[obj.EvalMetric]:
        metrics = []
        for line in self.eval_lines:
            for item in line.items:
                if item.name.id not in EVAL_METRICS:
                    near = difflib.get_close_matches(item.name.id, sorted(EVAL_METRICS), n=1)
                    self.error("KD150", f"unknown evaluation metric {item.name.text!r}", item.name.span,
                               f"did you mean {near[0]!r}?" if near else "metrics: " + ", ".join(sorted(EVAL_METRICS)))
                    continue
                args = []
                for arg in item.args:
                    if not isinstance(arg, ast.Keyword):
                        self.error("KD150", "evaluation options are written name=value", arg.span, "write rouge_l(max_new_tokens=48)")
                        continue
                    value = self.literal(arg.value)
                    if value is not None:
                        args.append((arg.name.id, float(value) if isinstance(value, sympy.Basic) else value))
                metrics.append(obj.EvalMetric(item.name.id, tuple(args), item.span))
        return metrics

    def warn_about_objective(self, terms: list[obj.Term]) -> None:
        for term in terms:
            if term.coefficient.expr == 0:
                self.warn("KD155", f"term {term.name} has weight 0 and has no effect", term.span, "remove it")
                continue
            if not depends_on_student(term.loss):
                self.warn("KD151", f"term {term.name} does not depend on the student, so it adds no gradient", term.span,
                          "remove it, or compare against q")
        self.warn_about_scales(terms)

    def warn_about_scales(self, terms: list[obj.Term]) -> None:
        """Warn when the typical weights of two terms differ by a factor of 1000 or more."""
        ranges = algebra.domain(self.settings)
        scales = []
        for term in terms:
            scale = typical_magnitude(term, ranges)
            if scale is not None and scale > 0:
                scales.append((scale, term))
        if len(scales) < 2:
            return
        small = min(scales, key=lambda s: s[0])
        large = max(scales, key=lambda s: s[0])
        if large[0] / small[0] >= 1e3:
            self.warn("KD152", f"the typical weights of the terms differ by a factor of {large[0] / small[0]:.3g} "
                      f"({large[1].name}: {large[0]:.3g}, {small[1].name}: {small[0]:.3g})", small[1].span,
                      "check the scales; a term this small has almost no effect on training")

    def warn_unused_settings(self) -> None:
        for name, span in self.settings_written.items():
            if span is None:
                continue
            for prefix, construct in SETTING_USERS.items():
                if (name == prefix or name.startswith(prefix)) and prefix not in self.uses:
                    self.warn("KD153", f"setting {name!r} has no effect: the objective has no {construct}", span,
                              "remove the line")
        for name, function in self.functions.items():
            if not function.used and function.kind != "invalid":
                self.warn("KD154", f"{function.definition.name.text} is defined but never used", function.definition.name.span,
                          "remove it, or use it in the objective")


def typical_magnitude(term: obj.Term, ranges: dict) -> float | None:
    """Return the median absolute total weight of a term over probe points of its domain."""
    expr = term.coefficient.expr
    for weight in (term.token_weight, term.sequence_weight):
        if weight is not None:
            expr = expr * weight.expr
    symbols = sorted(expr.free_symbols, key=lambda s: s.name)
    if not symbols:
        return algebra.finite_float(sympy.Abs(expr))
    values = np.abs(algebra.evaluate_numeric(expr, algebra.probe_points(symbols, ranges, per_axis=5, limit=256)))
    values = values[np.isfinite(values)]
    return float(np.median(values)) if values.size else None


def _negative_message(label: str, loss: str, expr: sympy.Expr, point: dict) -> str:
    if not expr.free_symbols:
        return f"the {label} of {loss} is {_show(expr)}, which is negative"
    region = f" for {point['region']}" if point.get("region") else ""
    return (f"the {label} {_show(expr)} of {loss} is negative{region}: "
            f"it is {point['value']:.4g} at {algebra.format_point(point)}")


def _negative_hint(label: str, expr: sympy.Expr, ranges: dict) -> str:
    if label == "per-token weight" and obj.POSITION in expr.free_symbols:
        length = ranges[obj.POSITION][1]
        return (f"weights must be non-negative over their whole domain; positions t run from 1 to {length}, "
                "the larger of data.max_response_tokens and sgo.max_new_tokens; clip with max(..., 0)")
    if label == "per-token weight":
        return "weights must be non-negative for every token probability in (0, 1]; clip with max(..., 0)"
    if label == "sequence weight":
        return "a sequence weight multiplies each response's loss and must be non-negative"
    return ("a negative weight makes training maximise the loss without bound; only an entropy bonus "
            "such as - 0.1·H(q) may have one")


def _where(point: dict) -> str:
    where = algebra.format_point(point)
    region = point.get("region")
    if region:
        return f" for {region}" + (f" (e.g. at {where})" if where else "")
    return f" at {where}" if where else ""


def _show(value) -> str:
    """Print a number or expression for a message, in the spec language."""
    if isinstance(value, sympy.Basic):
        from kdsl.printing import format_scalar

        return format_scalar(value)
    return str(value)


def _confusable_hint(text: str) -> str | None:
    """Name a letter of another script that looks like an ASCII letter, as in Cyrillic 'о' for 'o'."""
    for ch in text:
        if ch in CONFUSABLES:
            script, *rest = unicodedata.name(ch).lower().split()
            return (f"{text!r} contains the {script.capitalize()} {' '.join(rest)} {ch!r} "
                    f"(U+{ord(ch):04X}), which looks like the ASCII {CONFUSABLES[ch]!r}")
    return None


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _math_example(name: str, arity: int | None) -> str:
    if name == "where":
        return "write where(t <= 64, 1, 0)"
    if arity is None:
        return f"write {name}(a, b)"
    return f"write {name}({', '.join(['x', 'low', 'high'][:arity])})"


def _divergence_example(kind: str) -> str:
    return {"H": "write H(q) or H(o, q)", "TV": "write TV(o, q)", "ULD": "write ULD(o, q)",
            "JS": "write JS[0.5](o ‖ q)", "SKL": "write SKL[0.1](o ‖ q)", "SRKL": "write SRKL[0.1](o ‖ q)",
            "Df": "write Df[f](o ‖ q)"}.get(kind, f"write {kind}(o ‖ q)")


def _unique(diagnostics: list[Diagnostic]) -> list[Diagnostic]:
    """Drop repeated diagnostics (a named value is checked at its definition and at each use)."""
    seen, result = set(), []
    for diagnostic in diagnostics:
        key = (diagnostic.code, diagnostic.message, diagnostic.span, diagnostic.severity)
        if key not in seen:
            seen.add(key)
            result.append(diagnostic)
    return result


def _add_hint(left, right) -> str | None:
    kinds = {describe(left), describe(right)}
    if "loss" in kinds and "number" in kinds:
        return "a constant added to a loss changes no gradient; multiply instead, as in 0.5·KL(o ‖ q)"
    if "distribution" in kinds and "loss" in kinds:
        return "wrap the distribution in a divergence, as in KL(o ‖ q)"
    if "sampling distribution" in kinds:
        return "sampling distributions go in E[w ~ D]; mix them with coefficients, as in 0.5·d_q + 0.5·d_data"
    return None


def describe(value) -> str:
    """Name the type of an evaluated value for messages."""
    if isinstance(value, _Lin):
        return {"dist": "distribution", "loss": "loss", "source": "sampling distribution"}[value.kind]
    if isinstance(value, _W):
        return "sequence w"
    if isinstance(value, sympy.logic.boolalg.Boolean) and not isinstance(value, sympy.Expr):
        return "comparison"
    return "number"


def classify(expr: sympy.Expr) -> str:
    symbols = expr.free_symbols
    # The length T belongs to both kinds: with o(w), q(w) or ref(w) it is a sequence weight, alone a per-token one.
    if symbols & (obj.TOKEN_ROLES - obj.SEQUENCE_ROLES):
        return "token"
    if symbols & (obj.SEQUENCE_ROLES - obj.TOKEN_ROLES):
        return "sequence"
    if symbols & obj.TOKEN_ROLES:
        return "token"
    if symbols & obj.SCHEDULE_ROLES:
        return "schedule"
    if any(isinstance(s, sympy.Dummy) for s in symbols):
        return "generator"
    return "constant"


def source_uses(source, kinds) -> bool:
    if isinstance(source, kinds):
        return True
    if isinstance(source, obj.MixtureSource):
        return any(source_uses(s, kinds) for _, s in source.components)
    if isinstance(source, obj.AdaptiveSource):
        return source_uses(source.student, kinds) or source_uses(source.data, kinds)
    return False


def depends_on_student(divergence: obj.Divergence) -> bool:
    if divergence.kind == "CE":
        return True

    def uses_q(dist) -> bool:
        if isinstance(dist, obj.ModelDist):
            return dist.model == "q"
        if isinstance(dist, obj.ProjectedDist):
            return True  # both projections are trained with the student
        return any(uses_q(d) for _, d in dist.components)

    return any(uses_q(d) for d in divergence.args)


def parse_override(setting, raw):
    """Convert a `--set key=value` string to the setting's type; strings pass through unchanged."""
    if not isinstance(raw, str):
        if isinstance(raw, float) and math.isfinite(raw):
            return algebra.constant(raw)
        return raw
    if setting.kind is bool:
        lowered = raw.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        return raw
    if setting.kind in (int, float):
        try:
            return algebra.number(raw.strip())
        except ValueError:
            return raw
    return raw


def check(spec: ast.Spec, overrides: dict[str, Any] | None = None, *, same_vocab: bool | None = None) -> obj.Objective:
    """Validate a parsed spec; raise `SpecError` with every error found.

    `same_vocab` states whether teacher and student share a tokenizer. False
    makes unprojected comparisons across vocabularies an error, and None
    (unknown) leaves that check to run time.
    """
    return Checker(spec, overrides, same_vocab).run()
