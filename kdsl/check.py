"""Semantic validation: turn a parsed spec into a typed, validated `Objective`.

The checker evaluates each expression of the spec to a typed value: a scalar
(a sympy expression over role symbols), a distribution, a loss or a sampling
source, each a linear combination of atoms with scalar coefficients. It
collects every error it finds and raises them together, sorted by position.

Diagnostic codes:
  KD1xx names, settings and definitions; KD12x types of expressions;
  KD13x distributions, divergences and their parameters; KD14x weights and
  schedules; KD15x warnings about the objective as a whole.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sympy

from kdsl import algebra, ast
from kdsl import objective as obj
from kdsl.errors import Diagnostic, SpecError, Span
from kdsl.parse import canonical_name
from kdsl.settings import SETTINGS, nearest_setting

DIVERGENCES = {"KL", "JS", "TV", "SKL", "SRKL", "Df", "H", "ULD"}
PARAMETRISED = {"JS", "SKL", "SRKL", "Df"}
MODELS = {"o", "q"}
SOURCES = {"d_data", "d_o", "d_q"}
ROLE_NAMES = {"t", "T", "w", "epoch", "step", "progress"}
RESERVED = DIVERGENCES | MODELS | SOURCES | {"CE", "adaptive", "w_t", "ref", "objective", "E"} | set(algebra.MATH_FUNCTIONS) | set(algebra.MATH_CONSTANTS)
ROLE_SYMBOLS = {"t": obj.POSITION, "T": obj.LENGTH, "epoch": obj.EPOCH, "step": obj.STEP, "progress": obj.PROGRESS}
ADAPTIVE_KEYWORDS = {"init_prob", "max_prob", "step", "threshold", "replay_capacity", "replay_ratio"}
EVAL_METRICS = {"ce", "kl", "rouge_l", "exposure_bias", "bpc"}
# Settings that only matter when the objective uses a construct.
SETTING_USERS = {
    "sgo.": "a generated source (d_q or d_o)",
    "adaptive.": "adaptive(...)",
    "mixture.": "a mixture of sources",
    "js.": "JS[β]",
    "rho.": "a sequence weight ρ(w)",
    "projection.": "a projection o→q or q→o",
    "ref": "a reference model ref(w)",
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

    # --- diagnostics ---------------------------------------------------------------

    def error(self, code: str, message: str, span: Span | None, hint: str | None = None) -> None:
        self.diagnostics.append(Diagnostic(code, message, span, hint))

    def warn(self, code: str, message: str, span: Span | None, hint: str | None = None) -> None:
        self.diagnostics.append(Diagnostic(code, message, span, hint, severity="warning"))

    # --- entry point ---------------------------------------------------------------

    def run(self) -> obj.Objective:
        self.collect_statements()
        self.resolve_settings()
        self.check_definitions()
        terms, groups = self.check_objective()
        evals = self.check_evals()
        if terms:
            self.warn_about_objective(terms)
        self.warn_unused_settings()
        errors = [d for d in self.diagnostics if d.severity == "error"]
        if errors:
            raise SpecError(self.diagnostics, self.spec.text)
        definitions = {
            name: obj.FunctionDef(name, tuple(p.id for p in f.definition.params), f.body, f.kind or "constant", f.definition.span)
            for name, f in self.functions.items()
            if f.body is not None
        }
        return obj.Objective(
            terms=terms,
            groups=groups,
            settings=dict(self.settings),
            definitions=definitions,
            evals=evals,
            reduction=self.settings["reduction"],
            warnings=sorted(self.diagnostics, key=Diagnostic.sort_key),
            path=self.spec.path,
            source_text=self.spec.text,
        )

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
                           f"did you mean {near!r}?" if near else "run 'kdsl check --settings' to list the known settings")
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
                       "choose another name")
            return
        if name.id in self.functions:
            first = self.functions[name.id].definition.span.line
            self.error("KD104", f"{name.text!r} is defined twice", name.span, f"the first definition is at line {first}")
            return
        seen = set()
        for param in definition.params:
            if param.id in seen:
                self.error("KD107", f"parameter {param.text!r} appears twice in {name.text}(...)", param.span)
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
            self.error("KD104", f"setting {name!r} takes true or false, got {value!r}", span)
            return None
        if setting.kind is str:
            if not isinstance(value, str):
                self.error("KD104", f"setting {name!r} takes a quoted string, got {value}", span, f'write {name} = "{value}"')
                return None
            if setting.choices and value not in setting.choices:
                near = difflib.get_close_matches(value, setting.choices, n=1)
                hint = f"did you mean {near[0]!r}?" if near else f"use {setting.describe_range()}"
                self.error("KD104", f"invalid value {value!r} for {name!r}: expected {setting.describe_range()}", span, hint)
                return None
            return value
        if isinstance(value, (str, bool)):
            self.error("KD104", f"setting {name!r} takes a number, got {value!r}", span)
            return None
        number = sympy.Rational(value)
        if setting.kind is int:
            if not number.is_integer:
                self.error("KD104", f"setting {name!r} takes a whole number, got {float(number):g}", span)
                return None
            converted = int(number)
        else:
            converted = float(number)
        if (setting.minimum is not None and converted < setting.minimum) or (
            setting.maximum is not None and converted > setting.maximum
        ):
            self.error("KD104", f"value {converted:g} of {name!r} is out of range: expected {setting.describe_range()}", span,
                       f"{setting.help}")
            return None
        return converted

    def resolve_settings(self) -> None:
        for name, raw in self.overrides.items():
            if name not in SETTINGS:
                near = nearest_setting(name)
                self.error("KD102", f"unknown setting {name!r} in the overrides", None,
                           f"did you mean {near!r}?" if near else "run 'kdsl check --settings' to list the known settings")
                continue
            value = parse_override(SETTINGS[name], raw)
            converted = self.convert_setting(name, value, None)
            if converted is not None:
                self.settings[name] = converted
                self.settings_written.setdefault(name, None)

    # --- definitions ---------------------------------------------------------------

    def check_definitions(self) -> None:
        for name in list(self.functions):
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
                        self.warn("KD112", f"parameter 'w' of {definition.name.text} is not used", param.span)
                elif symbol is not None and symbol not in used_symbols:
                    self.warn("KD112", f"parameter {param.text!r} of {definition.name.text} is not used", param.span)

    def function_body(self, name: str) -> sympy.Expr | None:
        """Evaluate a definition's body once with its parameters bound to their role symbols."""
        function = self.functions[name]
        if function.body is not None or function.kind == "invalid":
            return function.body
        definition = function.definition
        if name in self.evaluating:
            cycle = " → ".join(self.evaluating[self.evaluating.index(name):] + [name])
            self.error("KD111", f"definitions refer to each other in a cycle: {cycle}", definition.name.span)
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
        if not isinstance(value, sympy.Basic):
            if len(definition.params) == 0:
                # A named distribution, loss or source (`mix = 0.5·d_q + 0.5·d_data`) is inlined where used.
                function.kind = "value"
                return None
            self.error("KD121", f"the body of {definition.name.text} must be a number-valued expression, not a {describe(value)}",
                       definition.body.span, "define losses in the objective; definitions hold weights and schedules")
            function.kind = "invalid"
            return None
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
            value = scope[name]
            return value
        if name in ROLE_SYMBOLS or name == "w":
            if context is None:
                return ROLE_SYMBOLS[name] if name in ROLE_SYMBOLS else _W(node.span)
            params = ", ".join([p.text for p in self.functions[context].definition.params] + [name])
            self.error("KD110", f"{name!r} is used in the body of {context} but is not one of its parameters", node.span,
                       f"add it: {context}({params})")
            return None
        if name in MODELS:
            return _Lin("dist", [(sympy.Integer(1), obj.ModelDist(name, span=node.span), None)], node.span)
        if name in SOURCES:
            atom = {"d_data": obj.DataSource, "d_o": obj.TeacherSource, "d_q": obj.StudentSource}[name](span=node.span)
            return _Lin("source", [(sympy.Integer(1), atom, None)], node.span)
        if name == "CE":
            self.uses.add("CE")
            return _Lin("loss", [(sympy.Integer(1), obj.Divergence("CE", span=node.span), None)], node.span)
        if name in algebra.MATH_CONSTANTS:
            return algebra.MATH_CONSTANTS[name]
        if name in SETTINGS:
            return self.setting_value(node)
        if name in self.functions:
            function = self.functions[name]
            function.used = True
            if function.definition.params:
                self.error("KD113", f"{node.text} takes {len(function.definition.params)} argument(s)", node.span,
                           f"call it: {node.text}({', '.join(p.text for p in function.definition.params)})")
                return None
            body = self.function_body(name)
            if function.kind == "value":
                # A named distribution, loss or source is inlined where it is used.
                return self.evaluate(function.definition.body, {}, context=None)
            return body
        if name in DIVERGENCES:
            self.error("KD122", f"{name} needs arguments", node.span, f"write {name}(o ‖ q)")
            return None
        if name in ("true", "false"):
            self.error("KD120", f"{name} is a value for settings, not for expressions", node.span)
            return None
        self.error("KD101", f"unknown name {node.text!r}", node.span, self.suggest(name, scope))
        return None

    def setting_value(self, node: ast.Name):
        self.settings_read.add(node.id)
        value = self.settings[node.id]
        if isinstance(value, str):
            self.error("KD120", f"setting {node.id!r} is a string and cannot appear in arithmetic", node.span)
            return None
        return algebra.constant(value)

    def suggest(self, name: str, scope: dict) -> str | None:
        known = set(RESERVED) | set(ROLE_NAMES) | set(self.functions) | set(scope) | set(SETTINGS)
        known -= {"objective"}
        near = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.5)
        if not near:
            lowered = {k.lower(): k for k in known}
            if name.lower() in lowered:
                near = [lowered[name.lower()]]
        return f"did you mean {near[0]!r}?" if near else None

    def eval_negate(self, node: ast.Negate, scope, context):
        value = self.evaluate(node.operand, scope, context)
        if value is None:
            return None
        if isinstance(value, _Lin):
            return value.scaled(sympy.Integer(-1), node.span)
        if isinstance(value, _W):
            return self.misuse_w(value)
        return -value

    def misuse_w(self, value: _W):
        self.error("KD123", "'w' is the sampled sequence; use it as an argument, as in o(w) or λ(t, w)", value.span)
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
        op = node.op
        left_lin, right_lin = isinstance(left, _Lin), isinstance(right, _Lin)
        if not left_lin and not right_lin:
            return {"+": sympy.Add, "-": lambda a, b: a - b, "*": sympy.Mul, "/": lambda a, b: a / b,
                    "^": sympy.Pow}[op](left, right)
        if op in ("+", "-"):
            if left_lin and right_lin and left.kind == right.kind:
                if op == "-" and left.kind != "loss":
                    self.error("KD124", f"cannot subtract one {describe(right)} from another", node.span,
                               "a mixture is a weighted sum with non-negative coefficients")
                    return None
                other = right if op == "+" else right.scaled(sympy.Integer(-1), node.span)
                return _Lin(left.kind, left.items + other.items, node.span)
            self.error("KD124", f"cannot {'add' if op == '+' else 'subtract'} {describe(left)} and {describe(right)}", node.span,
                       _add_hint(left, right))
            return None
        if op == "*":
            if left_lin and right_lin:
                self.error("KD125", f"cannot multiply {describe(left)} by {describe(right)}", node.span,
                           "an objective is a weighted sum of losses; weights are number-valued")
                return None
            lin, factor = (left, right) if left_lin else (right, left)
            return lin.scaled(factor, node.span)
        if op == "/":
            if right_lin:
                self.error("KD125", f"cannot divide by {describe(right)}", node.span)
                return None
            return left.scaled(1 / right, node.span)
        self.error("KD125", f"cannot raise {describe(left if left_lin else right)} to a power", node.span)
        return None

    def eval_compare(self, node: ast.Compare, scope, context):
        left = self.evaluate(node.left, scope, context)
        right = self.evaluate(node.right, scope, context)
        if left is None or right is None:
            return None
        if not isinstance(left, sympy.Basic) or not isinstance(right, sympy.Basic):
            self.error("KD120", "comparisons take number-valued expressions", node.span)
            return None
        return {"<": sympy.StrictLessThan, "<=": sympy.LessThan, ">": sympy.StrictGreaterThan,
                ">=": sympy.GreaterThan, "==": sympy.Eq}[node.op](left, right)

    def eval_keyword(self, node: ast.Keyword, scope, context):
        self.error("KD120", f"keyword argument {node.name.text}= is not allowed here", node.span)
        return None

    def eval_project(self, node: ast.Project, scope, context):
        source = node.source
        if not (isinstance(source, ast.Name) and source.id in MODELS) or node.target.id not in MODELS or node.target.id == source.id:
            self.error("KD131", "a projection is written o→q (teacher into the student's vocabulary) or q→o", node.span)
            return None
        self.uses.add("projection.")
        atom = obj.ProjectedDist(source.id, span=node.span)
        return _Lin("dist", [(sympy.Integer(1), atom, None)], node.span)

    def eval_expectation(self, node: ast.Expectation, scope, context):
        if context is not None:
            self.error("KD126", "E[...] belongs in the objective, not in a definition", node.head_span)
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
                self.error("KD126", "expectations cannot be nested", node.head_span)
                return None
            items.append((coefficient, atom, source))
        return _Lin("loss", items, node.span)

    def eval_subscript(self, node: ast.Subscript, scope, context):
        base = node.base
        if isinstance(base, ast.Name) and base.id in MODELS:
            return self.model_options(node, base)
        if isinstance(base, ast.Name) and base.id in PARAMETRISED:
            self.error("KD122", f"{base.id}[...] needs arguments", node.span, f"write {base.id}[...](o ‖ q)")
            return None
        self.error("KD120", "brackets [...] follow o or q (o[τ=2], o[top_k=64]) or a divergence (JS[0.5])", node.span)
        return None

    def model_options(self, node: ast.Subscript, base: ast.Name):
        temperature, top_k = None, None
        for item in node.items:
            if not isinstance(item, ast.Keyword) or item.name.id not in ("τ", "temperature", "top_k"):
                span = item.span
                self.error("KD132", f"unknown option for {base.id}", span, "write o[τ=2] or o[top_k=64]")
                return None
            value = self.evaluate(item.value, {}, None)
            if value is None:
                return None
            if not isinstance(value, sympy.Basic):
                self.error("KD132", f"{item.name.text} takes a number", item.value.span)
                return None
            if item.name.id == "top_k":
                if value.free_symbols or not value.is_integer or value < 1:
                    self.error("KD132", f"top_k must be a whole number >= 1, got {value}", item.value.span)
                    return None
                top_k = int(value)
            else:
                if not self.check_positive(value, item.value.span, "temperature τ"):
                    return None
                temperature = obj.Scalar(value, item.value.span)
        atom = obj.ModelDist(base.id, temperature=temperature, top_k=top_k, span=node.span)
        return _Lin("dist", [(sympy.Integer(1), atom, None)], node.span)

    def check_positive(self, value: sympy.Expr, span: Span, what: str) -> bool:
        if value.free_symbols - obj.SCHEDULE_ROLES:
            self.error("KD140", f"{what} must be a constant or a schedule of epoch, step or progress", span)
            return False
        ranges = algebra.domain(self.settings)
        proved, point = algebra.find_negative(value - sympy.Rational(1, 10**9), ranges)
        if point is not None:
            where = algebra.format_point(point)
            self.error("KD140", f"{what} must be positive, but it is {point['value'] + 1e-9:g}" + (f" at {where}" if where else ""), span)
            return False
        return True

    def eval_call(self, node: ast.Call, scope, context):
        func = node.func
        if isinstance(func, ast.Subscript) and isinstance(func.base, ast.Name) and func.base.id in PARAMETRISED:
            return self.divergence(func.base.id, node, func.items, scope, context)
        if not isinstance(func, ast.Name):
            self.error("KD120", "only names can be called", func.span)
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
        if name in algebra.MATH_FUNCTIONS:
            return self.math_call(node, scope, context)
        if name in self.functions:
            return self.user_call(node, scope, context)
        if name == "CE":
            self.error("KD122", "CE takes no arguments", node.span, "write CE")
            return None
        self.error("KD101", f"unknown function {func.text!r}", func.span, self.suggest(name, scope))
        return None

    def positional(self, node: ast.Call, scope, context) -> list | None:
        values = []
        for arg in node.args:
            if isinstance(arg, ast.Keyword):
                self.error("KD122", f"unexpected keyword argument {arg.name.text}=", arg.span)
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
            self.error("KD113", f"{node.func.text} takes {expected} argument(s), got {len(args)}", node.span)
            return None
        for arg, arg_node in zip(args, node.args):
            if not isinstance(arg, sympy.Basic) or (isinstance(arg, sympy.logic.boolalg.Boolean) and node.func.id != "where"):
                self.error("KD120", f"{node.func.text} takes number-valued arguments, got {describe(arg)}", arg_node.span)
                return None
        if node.func.id == "where" and not isinstance(args[0], sympy.logic.boolalg.Boolean):
            self.error("KD120", "the first argument of where must be a comparison, as in where(t <= 64, 1, 0)", node.args[0].span)
            return None
        return func(*args)

    def token_probability(self, node: ast.Call, scope, context):
        name = node.func.id
        if len(node.args) != 1 or not isinstance(node.args[0], ast.Name) or node.args[0].id not in ("w_t", "w"):
            self.error("KD122", f"{name}(...) takes w_t (the token at position t) or w (the whole sequence)", node.span,
                       f"write {name}(w_t) or {name}(w)")
            return None
        arg = node.args[0]
        if context is not None and "w" not in scope:
            params = ", ".join([p.text for p in self.functions[context].definition.params] + ["w"])
            self.error("KD110", f"{name}({arg.text}) depends on the sampled sequence w, which is not a parameter of {context}",
                       arg.span, f"add it: {context}({params})")
            return None
        if name == "ref":
            if arg.id != "w":
                self.error("KD122", "ref takes the whole sequence: ref(w)", node.span)
                return None
            if not self.settings.get("ref"):
                self.error("KD134", "ref(w) needs a reference model", node.span, 'set ref = "path or builtin name"')
                return None
            self.uses.add("ref")
            return sympy.exp(obj.LOG_REF_SEQ)
        if arg.id == "w_t":
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
            self.error("KD113", f"{node.func.text} takes {len(params)} argument(s) ({expected}), got {len(node.args)}", node.span,
                       f"call it as {node.func.text}({expected})")
            return None
        if self.function_body(name) is None:
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
                    self.error("KD122", f"argument {param.text} of {node.func.text} must be the sampled sequence w", arg_node.span)
                    return None
            elif isinstance(value, (_W, _Lin)):
                self.error("KD122", f"argument {param.text} of {node.func.text} must be number-valued, got {describe(value)}",
                           arg_node.span)
                return None
            inner[param.id] = value
        body = function.body
        substitutions = {ROLE_SYMBOLS[p]: v for p, v in inner.items() if p in ROLE_SYMBOLS and p != "w"}
        return body.xreplace(substitutions) if substitutions else body

    def adaptive(self, node: ast.Call, scope, context):
        self.uses.add("adaptive.")
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
            self.error("KD136", "adaptive takes the student source and a fallback: adaptive(d_q, d_data)", node.span)
            return None
        resolved = {key[len("adaptive."):]: self.settings[key] for key in SETTINGS if key.startswith("adaptive.")}
        resolved.update(params)
        atom = obj.AdaptiveSource(sources[0], sources[1], tuple(sorted(resolved.items())), span=node.span)
        return _Lin("source", [(sympy.Integer(1), atom, None)], node.span)

    # --- distributions and divergences ------------------------------------------------

    def divergence(self, kind: str, node: ast.Call, items, scope, context):
        if context is not None:
            self.error("KD121", f"{kind} is a loss; losses belong in the objective, not in the definition of {context}", node.span)
            return None
        param, generator = None, None
        if kind in PARAMETRISED:
            if len(items) != 1 or isinstance(items[0], ast.Keyword):
                self.error("KD133", f"{kind}[...] takes one parameter", node.func.span)
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
        arity = {"H": (1, 2), "TV": (2,), "ULD": (2,)}.get(kind, (2,))
        if len(args) not in arity:
            expected = " or ".join(str(a) for a in arity)
            self.error("KD113", f"{kind} takes {expected} distribution(s), got {len(args)}", node.span,
                       f"write {kind}(o ‖ q)" if 2 in arity else f"write {kind}(o)")
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
            if not self.check_js_endpoint(param, dists, node):
                return None
        atom = obj.Divergence(kind, tuple(dists), param=param, generator=generator, span=node.span)
        return _Lin("loss", [(sympy.Integer(1), atom, None)], node.span)

    def divergence_parameter(self, kind: str, item: ast.Expr, scope) -> obj.Scalar | None:
        value = self.evaluate(item, {}, None)
        if value is None:
            return None
        symbol = "β" if kind == "JS" else "α"
        if not isinstance(value, sympy.Basic) or value.free_symbols - obj.SCHEDULE_ROLES:
            self.error("KD137", f"{symbol} of {kind} must be a constant or a schedule of epoch, step or progress", item.span)
            return None
        ok, point = algebra.in_unit_interval(value, algebra.domain(self.settings))
        if not ok:
            where = algebra.format_point(point)
            self.error("KD137", f"{symbol} of {kind} must lie in [0, 1], got {point['value']:g}" + (f" at {where}" if where else ""),
                       item.span, "a mixture weight is a probability")
            return None
        return obj.Scalar(value, item.span)

    def check_js_endpoint(self, param: obj.Scalar, dists, node) -> bool:
        if not param.is_constant or param.expr not in (0, 1):
            return True
        a, b = (describe_dist(d) for d in dists)
        meant = f"KL({a} ‖ {b})" if param.expr == 0 else f"KL({b} ‖ {a})"
        message = (f"JS[{param.expr}] is identically 0 (its mixture equals one of its arguments); "
                   f"TRL switches to {meant} at this endpoint")
        if self.settings["js.endpoint"] == "error":
            self.error("KD138", message, param.span, f"write {meant}, or a β strictly between 0 and 1")
            return False
        self.warn("KD138", message, param.span, f"write {meant} if that is what you mean")
        return True

    def generator(self, item: ast.Expr) -> sympy.Lambda | None:
        if not isinstance(item, ast.Name) or item.id not in self.functions:
            self.error("KD139", "Df[f] takes the name of a function of one variable", item.span,
                       "define it first, e.g. f(x) = x·log(x), then write Df[f](o ‖ q)")
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
            self.error("KD139", f"generator {item.text} may depend only on its variable", item.span)
            return None
        x = variable if variable is not None else sympy.Dummy(params[0].id, positive=True)
        at_one = sympy.simplify(body.subs(x, 1))
        if at_one != 0:
            self.error("KD139", f"generator {item.text} must satisfy f(1) = 0, but f(1) = {at_one}", item.span,
                       f"subtract the constant: {item.text}(x) = ... - ({at_one})")
            return None
        second = sympy.diff(body, x, 2)
        if not second.is_nonnegative:
            xs = np.logspace(-6, 6, 241)
            values = algebra.evaluate_numeric(second, {x: xs})
            bad = np.flatnonzero(values < -1e-12)
            if bad.size:
                self.error("KD139", f"generator {item.text} is not convex on (0, ∞): f''(x) = {second} is negative at x = {xs[bad[0]]:g}",
                           item.span, "an f-divergence needs a convex f")
                return None
            self.warn("KD139", f"could not prove generator {item.text} convex; f''(x) = {second} was non-negative at 241 points in [1e-6, 1e6]",
                      item.span)
        return sympy.Lambda(x, body)

    def make_dist(self, value, span: Span, kind: str):
        if not (isinstance(value, _Lin) and value.kind == "dist"):
            self.error("KD129", f"{kind} compares distributions, got {describe(value)}", span,
                       "use o, q, o[τ=2], o→q, or a mixture such as 0.5·o + 0.5·q")
            return None
        if len(value.items) == 1 and value.items[0][0] == 1:
            return value.items[0][1]
        components = []
        vocabularies = {atom.vocab for _, atom, _ in value.items}
        if len(vocabularies) > 1:
            self.error("KD130", "a mixture combines distributions over different vocabularies", span,
                       "project one side first, as in 0.5·o→q + 0.5·q")
            return None
        total = sympy.Integer(0)
        ranges = algebra.domain(self.settings)
        for coefficient, atom, _ in value.items:
            if coefficient.free_symbols - obj.SCHEDULE_ROLES:
                self.error("KD141", "mixture coefficients must be constants or schedules of epoch, step or progress", span)
                return None
            ok, point = algebra.in_unit_interval(coefficient, ranges)
            if not ok:
                where = algebra.format_point(point)
                self.error("KD141", f"mixture coefficient {coefficient} must lie in [0, 1], got {point['value']:g}"
                           + (f" at {where}" if where else ""), span)
                return None
            components.append((obj.Scalar(coefficient), atom))
            total += coefficient
        if not algebra.is_zero(total - 1):
            self.error("KD141", f"mixture coefficients must sum to 1, but they sum to {sympy.simplify(total)}", span,
                       "write the last coefficient as 1 minus the others, e.g. α·o + (1 - α)·q")
            return None
        return obj.MixtureDist(tuple(components), span=span)

    def check_vocabularies(self, kind: str, dists, node: ast.Call) -> bool:
        if len(dists) < 2 or kind == "ULD" or self.same_vocab is not False:
            return True
        first, second = dists[0].vocab, dists[1].vocab
        if first == second:
            return True
        a, b = describe_dist(dists[0]), describe_dist(dists[1])
        fix = f"{kind}(o→q ‖ q)" if dists[0].vocab == "teacher" else f"{kind}(q→o ‖ o)"
        self.error("KD130", f"{kind}({a} ‖ {b}) compares distributions over different vocabularies "
                   f"({first} and {second}): the teacher and student tokenizers differ", node.span,
                   f"project one side into the other's vocabulary, e.g. {fix}, or use ULD({a}, {b})")
        return False

    def make_source(self, value: _Lin, span: Span):
        if len(value.items) == 1 and value.items[0][0] == 1:
            return value.items[0][1]
        ranges = algebra.domain(self.settings)
        total = sympy.Integer(0)
        components = []
        for coefficient, atom, _ in value.items:
            if coefficient.free_symbols - obj.SCHEDULE_ROLES:
                self.error("KD141", "mixture probabilities must be constants or schedules of epoch, step or progress", span)
                return None
            ok, point = algebra.in_unit_interval(coefficient, ranges)
            if not ok:
                where = algebra.format_point(point)
                self.error("KD141", f"mixture probability {coefficient} must lie in [0, 1], got {point['value']:g}"
                           + (f" at {where}" if where else ""), span)
                return None
            components.append((obj.Scalar(coefficient), atom))
            total += coefficient
        if not algebra.is_zero(total - 1):
            self.error("KD141", f"mixture probabilities must sum to 1, but they sum to {sympy.simplify(total)}", span,
                       "write the last probability as 1 minus the others, e.g. α·d_q + (1 - α)·d_data")
            return None
        self.uses.add("mixture.")
        return obj.MixtureSource(tuple(components), per=self.settings["mixture.per"], span=span)

    # --- the objective -----------------------------------------------------------------

    def check_objective(self):
        node = self.objective_node
        if node is None:
            return [], []
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
            term = self.make_term(coefficient, divergence, group, source, names_seen)
            if term is not None:
                terms.append(term)
        return terms, groups

    def make_term(self, coefficient: sympy.Expr, divergence: obj.Divergence, group: int, source, names_seen) -> obj.Term | None:
        schedule, token, sequence = [], [], []
        for factor in sympy.Mul.make_args(coefficient):
            symbols = factor.free_symbols
            if symbols & obj.TOKEN_ROLES:
                token.append(factor)
            elif symbols & (obj.SEQUENCE_ROLES - obj.TOKEN_ROLES):
                sequence.append(factor)
            else:
                schedule.append(factor)
        span = divergence.span
        ranges = algebra.domain(self.settings)
        parts = {"weight": sympy.Mul(*schedule), "per-token weight": sympy.Mul(*token), "sequence weight": sympy.Mul(*sequence)}
        for label, expr in parts.items():
            proved, point = algebra.find_negative(expr, ranges)
            if point is not None:
                where = algebra.format_point(point)
                self.error("KD143", f"the {label} of {describe_divergence(divergence)} is negative: {expr} = {point['value']:g}"
                           + (f" at {where}" if where else ""), span,
                           "weights must be non-negative over their whole domain; "
                           "positions t run up to max(data.max_response_tokens, sgo.max_new_tokens)")
                return None
            if not proved and expr.free_symbols:
                self.warn("KD144", f"could not prove the {label} {expr} of {describe_divergence(divergence)} non-negative; "
                          "it was non-negative at every probed point", span)
        name = describe_divergence(divergence)
        if name in names_seen:
            names_seen[name] += 1
            name = f"{name}#{names_seen[name]}"
        else:
            names_seen[name] = 1
        token_weight = obj.Scalar(parts["per-token weight"]) if token else None
        sequence_weight = obj.Scalar(parts["sequence weight"]) if sequence else None
        return obj.Term(name, divergence, obj.Scalar(parts["weight"]), token_weight, sequence_weight, group, span)

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
                        self.error("KD150", "evaluation options are written name=value", arg.span)
                        continue
                    value = self.literal(arg.value)
                    if value is not None:
                        args.append((arg.name.id, float(value) if isinstance(value, sympy.Basic) else value))
                metrics.append(obj.EvalMetric(item.name.id, tuple(args), item.span))
        return metrics

    def warn_about_objective(self, terms: list[obj.Term]) -> None:
        for term in terms:
            if not depends_on_student(term.loss):
                self.warn("KD151", f"term {term.name} does not depend on the student, so it adds no gradient", term.span,
                          "remove it, or compare against q")
        constants = [(abs(float(t.coefficient.expr)), t) for t in terms if t.coefficient.is_constant and float(t.coefficient.expr) != 0]
        if len(constants) >= 2:
            small, large = min(constants, key=lambda c: c[0]), max(constants, key=lambda c: c[0])
            if large[0] / small[0] >= 1e3:
                self.warn("KD152", f"term weights differ by a factor of {large[0] / small[0]:g} "
                          f"({large[1].name}: {large[0]:g}, {small[1].name}: {small[0]:g})", small[1].span,
                          "check the scales; a term this small has no effect on training")

    def warn_unused_settings(self) -> None:
        for name, span in self.settings_written.items():
            if span is None:
                continue
            for prefix, construct in SETTING_USERS.items():
                if (name == prefix or name.startswith(prefix)) and prefix not in self.uses:
                    self.warn("KD153", f"setting {name!r} has no effect: the objective uses no {construct}", span)
        for name, function in self.functions.items():
            if not function.used and function.kind != "invalid":
                self.warn("KD154", f"{function.definition.name.text} is defined but never used", function.definition.name.span)


def _add_hint(left, right) -> str | None:
    kinds = {describe(left), describe(right)}
    if "loss" in kinds and "number" in kinds:
        return "a constant added to a loss changes no gradient; multiply instead, as in 0.5·KL(o ‖ q)"
    if "distribution" in kinds and "loss" in kinds:
        return "wrap the distribution in a divergence, as in KL(o ‖ q)"
    return None


def describe(value) -> str:
    """Name the type of an evaluated value for messages."""
    if isinstance(value, _Lin):
        return {"dist": "distribution", "loss": "loss", "source": "sampling distribution"}[value.kind]
    if isinstance(value, _W):
        return "sequence w"
    return "number"


def classify(expr: sympy.Expr) -> str:
    symbols = expr.free_symbols
    if symbols & obj.TOKEN_ROLES:
        return "token"
    if symbols & obj.SEQUENCE_ROLES:
        return "sequence"
    if symbols & obj.SCHEDULE_ROLES:
        return "schedule"
    if any(isinstance(s, sympy.Dummy) for s in symbols):
        return "generator"
    return "constant"


def describe_dist(dist) -> str:
    """Render a distribution in the language's own spelling (`o[τ=2]`, `0.1·o + 0.9·q`)."""
    if isinstance(dist, obj.ModelDist):
        options = []
        if dist.temperature is not None:
            options.append(f"τ={dist.temperature.expr}")
        if dist.top_k is not None:
            options.append(f"top_k={dist.top_k}")
        return dist.model + (f"[{', '.join(options)}]" if options else "")
    if isinstance(dist, obj.ProjectedDist):
        return f"{dist.source}→{dist.target}"
    return " + ".join(f"{c.expr}·{describe_dist(d)}" for c, d in dist.components)


def describe_divergence(divergence: obj.Divergence) -> str:
    """Render a loss atom as written in a spec: `KL(o‖q)`, `JS[1/2](o‖q)`, `CE`."""
    if divergence.kind == "CE":
        return "CE"
    args = [describe_dist(d) for d in divergence.args]
    joined = ", ".join(args) if divergence.kind in ("TV", "H", "ULD") else "‖".join(args)
    if divergence.param is not None:
        return f"{divergence.kind}[{divergence.param.expr}]({joined})"
    if divergence.generator is not None:
        return f"Df[{divergence.generator.expr}]({joined})"
    return f"{divergence.kind}({joined})"


def describe_source(source) -> str:
    """Render a sampling distribution as written in a spec."""
    if isinstance(source, (obj.DataSource, obj.TeacherSource, obj.StudentSource)):
        return source.name
    if isinstance(source, obj.MixtureSource):
        return " + ".join(f"{c.expr}·{describe_source(s)}" for c, s in source.components)
    return f"adaptive({describe_source(source.student)}, {describe_source(source.data)})"


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

    `same_vocab` says whether teacher and student share a tokenizer: False makes
    unprojected comparisons across vocabularies an error, None (unknown) defers
    that check to run time.
    """
    return Checker(spec, overrides, same_vocab).run()
