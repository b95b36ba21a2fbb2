"""LaTeX for a checked objective, in the user's own names and term order.

The spec's syntax tree is rebuilt as an unevaluated tree of sympy objects:
one `sympy.Function` subclass per construct of the language (expectation,
each divergence, mixtures, weights, arithmetic), so sympy never reorders or
simplifies what the user wrote. `LatexPrinter` prints that tree with one
`_print_<Class>` method per construct. The output is ASCII-only and needs
the amsmath and amssymb packages.

    kdsl.latex.render(objective)                   # an align* block and a sentence
    kdsl.latex.render(objective, standalone=True)  # a compilable document
"""

from __future__ import annotations

import unicodedata

import sympy
from sympy.printing.printer import Printer

from kdsl import ast
from kdsl import objective as obj
from kdsl.errors import InternalError

__all__ = ["render", "build", "LatexPrinter", "latex_name"]

GREEK_COMMANDS = {
    "α": r"\alpha", "β": r"\beta", "γ": r"\gamma", "δ": r"\delta", "ε": r"\varepsilon", "ζ": r"\zeta",
    "η": r"\eta", "θ": r"\theta", "ι": r"\iota", "κ": r"\kappa", "λ": r"\lambda", "μ": r"\mu",
    "ν": r"\nu", "ξ": r"\xi", "π": r"\pi", "ρ": r"\rho", "σ": r"\sigma", "ς": r"\varsigma", "τ": r"\tau",
    "υ": r"\upsilon", "φ": r"\varphi", "χ": r"\chi", "ψ": r"\psi", "ω": r"\omega", "ο": "o",
    "Γ": r"\Gamma", "Δ": r"\Delta", "Θ": r"\Theta", "Λ": r"\Lambda", "Ξ": r"\Xi", "Π": r"\Pi",
    "Σ": r"\Sigma", "Υ": r"\Upsilon", "Φ": r"\Phi", "Ψ": r"\Psi", "Ω": r"\Omega",
    "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N",
    "Ο": "O", "Ρ": "P", "Τ": "T", "Χ": "X",
}
# Names of the language with a fixed rendering.
FIXED_NAMES = {
    "q": r"q_\theta", "d_data": r"d_{\mathrm{data}}", "d_o": "d_{o}", "d_q": r"d_{q_\theta}",
    "w_t": "w_t", "π": r"\pi", "CE": r"\mathrm{CE}",
}
REDUCTION_SENTENCES = {
    "token": ("every expectation averages the per-position loss over all valid response tokens "
              r"$t = 1, \dots, T$ of the responses drawn in an optimizer step (reduction: token)"),
    "sequence": ("every expectation sums the per-position loss over the positions "
                 r"$t = 1, \dots, T$ of each response and averages these sums over responses (reduction: sequence)"),
}
DIVERGENCE_NAMES = {"KL": "KL", "JS": "JS", "SKL": "SKL", "SRKL": "SRKL", "TV": "TV"}


# --- names ------------------------------------------------------------------------------------


def latex_name(name: str) -> str:
    """Render a canonical kdsl name as ASCII LaTeX: `λ` → `\\lambda`, `α_kd` → `\\alpha_{\\mathrm{kd}}`, `epoch` → `\\mathrm{epoch}`."""
    if name in FIXED_NAMES:
        return FIXED_NAMES[name]
    if "" in name.split("_"):
        # Leading, trailing or doubled underscores (`__class__`) are shown as written.
        return r"\mathrm{" + _ascii(name).replace("_", r"\_") + "}"
    base, _, subscript = name.partition("_")
    rendered = _word(base)
    if subscript:
        rendered += "_{" + _subscript(subscript) + "}"
    return rendered


def _word(word: str) -> str:
    if len(word) == 1 and word in GREEK_COMMANDS:
        return GREEK_COMMANDS[word]
    if len(word) == 1 and word.isascii():
        return word
    if all(ch in GREEK_COMMANDS for ch in word):
        return " ".join(GREEK_COMMANDS[ch] for ch in word)
    return r"\mathrm{" + _ascii(word) + "}"


def _subscript(text: str) -> str:
    parts = [_word(part) if len(part) == 1 else r"\mathrm{" + _ascii(part) + "}" for part in text.split("_")]
    return r"\_".join(parts) if len(parts) > 1 else parts[0]


def _ascii(word: str) -> str:
    """Spell a word in ASCII: Greek letters as commands, accents dropped, other letters by code point."""
    pieces = []
    for ch in word:
        if ch.isascii():
            pieces.append(ch)
        elif ch in GREEK_COMMANDS:
            pieces.append("{" + GREEK_COMMANDS[ch] + "}")
        else:
            stripped = "".join(c for c in unicodedata.normalize("NFKD", ch) if c.isascii())
            pieces.append(stripped or f"u{ord(ch):04x}")
    return "".join(pieces)


def latex_number(text: str) -> str:
    """Render a numeric literal as the user wrote it: `0.5`, `3e-4` → `3 \\cdot 10^{-4}`."""
    lowered = text.lower()
    mantissa, _, exponent = lowered.partition("e")
    if mantissa.startswith("."):
        mantissa = "0" + mantissa
    if mantissa.endswith("."):
        mantissa = mantissa[:-1]
    if not exponent:
        return mantissa
    exponent = str(int(exponent))
    if mantissa in ("1", "1.0"):
        return f"10^{{{exponent}}}"
    return f"{mantissa} \\cdot 10^{{{exponent}}}"


# --- the display tree -------------------------------------------------------------------------


class Name(sympy.Symbol):
    """A name of the spec, printed with `latex_name`."""


class NumberLiteral(sympy.Symbol):
    """A numeric literal; its name is the text the user wrote."""


class _Construct(sympy.Function):
    """Base of the display constructs: never evaluated, printed by `LatexPrinter`."""

    precedence = 100

    @classmethod
    def eval(cls, *args):
        return None


class Plus(_Construct):
    precedence = 10


class Minus(_Construct):
    precedence = 10


class Times(_Construct):
    precedence = 20


class Divide(_Construct):
    precedence = 25


class Negative(_Construct):
    precedence = 15


class Power(_Construct):
    precedence = 30


class Comparison(_Construct):
    """args: (operator name, left, right)."""

    precedence = 5


class MathCall(_Construct):
    """A built-in function: args (function name, arguments...)."""


class UserCall(_Construct):
    """A user definition applied to arguments: args (name, arguments...)."""


class Expectation(_Construct):
    """args: (sampled variable, sampling distribution, body)."""


class Divergence(_Construct):
    """KL, JS, SKL, SRKL, TV: args (kind, parameter or empty, distributions...)."""


class FDivergence(_Construct):
    """Df[f]: args (generator name, distributions...)."""


class Entropy(_Construct):
    """H(a) or the cross-entropy H(a, b)."""


class UniversalLogit(_Construct):
    """ULD(a, b)."""


class Model(_Construct):
    """o or q with options: args (model, (option, value) pairs as Option)."""


class Option(_Construct):
    """One option of a model: args (option name, value)."""


class Projection(_Construct):
    """o→q or q→o: args (source model, target model, Option...)."""


class ProjectedCrossEntropy(_Construct):
    """CE(o→q): args (the projection)."""


class Probability(_Construct):
    """o(w_t), q(w), ref(w): args (model, argument)."""


class Adaptive(_Construct):
    """adaptive(d_q, d_data, options...)."""


class PositionSum(_Construct):
    """Σ(expr): the sum over positions t = 1..T."""


EMPTY = Name("")


# --- building the display tree from the syntax tree ---------------------------------------------


class _Builder:
    """Rebuild spec expressions as display constructs; settings become their resolved values."""

    def __init__(self, settings: dict):
        self.settings = settings

    def build(self, node):
        return getattr(self, "build_" + type(node).__name__.lower())(node)

    def build_number(self, node: ast.Number):
        return NumberLiteral(node.text)

    def build_string(self, node: ast.String):
        raise InternalError(f"a string reached the LaTeX printer at {node.span}")

    def build_name(self, node: ast.Name):
        if node.id in self.settings and not isinstance(self.settings[node.id], str):
            return NumberLiteral(_format_setting(self.settings[node.id]))
        if node.id in ("o", "q"):
            return Model(Name(node.id))
        return Name(node.id)

    def build_binaryop(self, node: ast.BinaryOp):
        kind = {"+": Plus, "-": Minus, "*": Times, "/": Divide, "^": Power}[node.op]
        return kind(self.build(node.left), self.build(node.right))

    def build_negate(self, node: ast.Negate):
        return Negative(self.build(node.operand))

    def build_compare(self, node: ast.Compare):
        return Comparison(Name(node.op), self.build(node.left), self.build(node.right))

    def build_expectation(self, node: ast.Expectation):
        return Expectation(Name(node.variable.id), self.build(node.distribution), self.build(node.body))

    def build_project(self, node: ast.Project):
        return Projection(Name(node.source.id), Name(node.target.id))

    def build_keyword(self, node: ast.Keyword):
        return Option(Name(node.name.id), self.build(node.value))

    def build_subscript(self, node: ast.Subscript):
        # Only o[...], q[...] and o→q[...] reach here; parametrised divergences are handled by build_call.
        options = [self.build(item) for item in node.items]
        if isinstance(node.base, ast.Project):
            return Projection(Name(node.base.source.id), Name(node.base.target.id), *options)
        return Model(Name(node.base.id), *options)

    def build_call(self, node: ast.Call):
        func = node.func
        args = [self.build(arg) for arg in node.args]
        if isinstance(func, ast.Subscript):
            kind = func.base.id
            (item,) = func.items
            if kind == "Df":
                return FDivergence(Name(item.id), *args)
            return Divergence(Name(kind), self.build(item), *args)
        name = func.id
        if name in DIVERGENCE_NAMES:
            return Divergence(Name(name), EMPTY, *args)
        if name == "H":
            return Entropy(*args)
        if name == "ULD":
            return UniversalLogit(*args)
        if name == "CE":
            return ProjectedCrossEntropy(*args)
        if name in ("o", "q", "ref"):
            return Probability(Name(name), Name(node.args[0].id))
        if name == "adaptive":
            return Adaptive(*args)
        if name == "Σ":
            return PositionSum(*args)
        from kdsl.algebra import MATH_FUNCTIONS

        if name in MATH_FUNCTIONS:
            return MathCall(Name(name), *args)
        return UserCall(Name(name), *args)


def _format_setting(value) -> str:
    number = float(value)
    return str(int(number)) if number.is_integer() else repr(number)


# --- the printer ---------------------------------------------------------------------------------


class LatexPrinter(Printer):
    """Print the display tree as ASCII LaTeX, one `_print_<Class>` per construct."""

    printmethod = "_kdsl_latex"

    def __init__(self):
        super().__init__()
        self.exponent_depth = 0

    def emptyPrinter(self, expr):
        raise InternalError(f"the LaTeX printer has no rule for {type(expr).__name__}: {expr!r}")

    def paren(self, expr, level: int) -> str:
        """Print `expr`, in parentheses when it binds less tightly than `level`."""
        text = self._print(expr)
        if _precedence(expr) < level:
            return r"\left(" + text + r"\right)"
        return text

    # Atoms.

    def _print_Name(self, expr):
        return latex_name(expr.name)

    def _print_NumberLiteral(self, expr):
        return latex_number(expr.name)

    # Arithmetic.

    def _print_Plus(self, expr):
        left, right = expr.args
        return f"{self.paren(left, 10)} + {self.paren(right, 10)}"

    def _print_Minus(self, expr):
        left, right = expr.args
        return f"{self.paren(left, 10)} - {self.paren(right, 11)}"

    def _print_Negative(self, expr):
        return "-" + self.paren(expr.args[0], 20)

    def _print_Times(self, expr):
        left, right = expr.args
        left_text, right_text = self.paren(left, 20), self.paren(right, 21)
        if right_text[:1].isdigit() or right_text.startswith("-") or isinstance(right, NumberLiteral):
            return f"{left_text} \\cdot {right_text}"
        if right_text.startswith(r"\left("):
            return f"{left_text} {right_text}"
        return f"{left_text} \\, {right_text}"

    def _print_Divide(self, expr):
        numerator, denominator = expr.args
        if self.exponent_depth:
            return f"{self.paren(numerator, 15)} / {self.paren(denominator, 26)}"
        return r"\frac{" + self._print(numerator) + "}{" + self._print(denominator) + "}"

    def _print_Power(self, expr):
        base, exponent = expr.args
        return self.paren(base, 31) + "^{" + self.in_exponent(exponent) + "}"

    def in_exponent(self, expr) -> str:
        self.exponent_depth += 1
        try:
            return self._print(expr)
        finally:
            self.exponent_depth -= 1

    def _print_Comparison(self, expr):
        op, left, right = expr.args
        symbol = {"<": "<", "<=": r"\le", ">": ">", ">=": r"\ge", "==": "="}[op.name]
        return f"{self.paren(left, 10)} {symbol} {self.paren(right, 10)}"

    # Functions.

    def _print_MathCall(self, expr):
        name, *args = expr.args
        function = name.name
        if function == "exp":
            return "e^{" + self.in_exponent(args[0]) + "}"
        if function == "sqrt":
            return r"\sqrt{" + self._print(args[0]) + "}"
        if function == "abs":
            return r"\left|" + self._print(args[0]) + r"\right|"
        if function == "where":
            condition, if_true, if_false = (self._print(a) for a in args)
            return (r"\begin{cases} " + if_true + r" & \text{if } " + condition + r" \\ "
                    + if_false + r" & \text{otherwise} \end{cases}")
        command = {"log": r"\log", "cos": r"\cos", "sin": r"\sin", "tanh": r"\tanh", "min": r"\min",
                   "max": r"\max", "sigmoid": r"\sigma", "clip": r"\operatorname{clip}"}[function]
        return command + self.arguments(args)

    def arguments(self, args) -> str:
        return r"\left(" + ", ".join(self._print(a) for a in args) + r"\right)"

    def _print_UserCall(self, expr):
        name, *args = expr.args
        return latex_name(name.name) + "(" + ", ".join(self._print(a) for a in args) + ")"

    def _print_PositionSum(self, expr):
        return r"\sum_{t=1}^{T} " + self.paren(expr.args[0], 20)

    def _print_Probability(self, expr):
        model, argument = expr.args
        head = r"p_{\mathrm{ref}}" if model.name == "ref" else latex_name(model.name)
        return f"{head}({latex_name(argument.name)})"

    # Distributions and sources.

    def _print_Model(self, expr):
        model, *options = expr.args
        text = latex_name(model.name)
        if not options:
            return text
        return text + "^{" + r",\, ".join(self._print(option) for option in options) + "}"

    def _print_Option(self, expr):
        name, value = expr.args
        if name.name == "top_k":
            return r"\mathrm{top}\text{-}" + self._print(value)
        return r"\tau=" + self._print(value)

    def _print_Projection(self, expr):
        source, target, *options = expr.args
        text = r"\rightarrow " + target.name
        if options:
            text += r",\, " + r",\, ".join(self._print(option) for option in options)
        return latex_name(source.name) + "^{" + text + "}"

    def _print_Adaptive(self, expr):
        sources = [a for a in expr.args if not isinstance(a, Option)]
        options = [a for a in expr.args if isinstance(a, Option)]
        text = r"\mathrm{adaptive}\left(" + ", ".join(self._print(s) for s in sources)
        if options:
            text += "; " + ", ".join(f"{_ascii_text(o.args[0].name)} = {self._print(o.args[1])}" for o in options)
        return text + r"\right)"

    # Losses.

    def _print_Expectation(self, expr):
        variable, source, body = expr.args
        return (r"\mathbb{E}_{" + latex_name(variable.name) + r" \sim " + self._print(source) + r"}\left["
                + self._print(body) + r"\right]")

    def _print_Divergence(self, expr):
        kind, parameter, *dists = expr.args
        head = r"D_{\mathrm{" + kind.name + "}}"
        if parameter != EMPTY:
            head += "^{(" + self._print(parameter) + ")}"
        separator = ", " if kind.name == "TV" else r" \,\|\, "
        return head + r"\left(" + separator.join(self._print(d) for d in dists) + r"\right)"

    def _print_FDivergence(self, expr):
        generator, *dists = expr.args
        return "D_{" + latex_name(generator.name) + r"}\left(" + r" \,\|\, ".join(self._print(d) for d in dists) + r"\right)"

    def _print_Entropy(self, expr):
        return r"\mathrm{H}" + self.arguments(expr.args)

    def _print_UniversalLogit(self, expr):
        return r"\mathrm{ULD}" + self.arguments(expr.args)

    def _print_ProjectedCrossEntropy(self, expr):
        return r"\mathrm{CE}" + self.arguments(expr.args)


def _precedence(expr) -> int:
    if isinstance(expr, _Construct):
        return type(expr).precedence
    return 100


def _ascii_text(name: str) -> str:
    return r"\mathrm{" + _ascii(name).replace("_", r"\_") + "}"


# --- assembling the output ---------------------------------------------------------------------------


def build(objective: obj.Objective) -> tuple[sympy.Basic, list[tuple[sympy.Basic, sympy.Basic]]]:
    """Return the display tree of the objective and (head, body) pairs of the definitions it uses, in spec order."""
    spec = _syntax(objective)
    builder = _Builder(objective.settings)
    objective_node = next(s for s in spec.statements if isinstance(s, ast.Assignment) and s.target.id == "objective")
    user = _user_definitions(spec, objective.settings)
    used = _used_definitions(objective_node.value, user)
    definitions = []
    for name, definition in user.items():
        if name not in used:
            continue
        params = [Name(p.id) for p in definition.params]
        head = UserCall(Name(name), *params) if params else Name(name)
        definitions.append((head, builder.build(definition.body)))
    tree = builder.build(objective_node.value)
    clip = _sequence_clip(objective)
    clipped = _clipped_calls(objective, tree) if clip is not None else None
    if clipped:
        tree = _wrap_calls(tree, clipped, NumberLiteral(_format_setting(clip)))
    return tree, definitions


def _sequence_clip(objective: obj.Objective) -> float | None:
    """Return `rho.clip` when it is set and some term has a sequence weight, else None."""
    clip = float(objective.settings.get("rho.clip", 0.0) or 0.0)
    if clip <= 0 or all(term.sequence_weight is None for term in objective.terms):
        return None
    return clip


def _clipped_calls(objective: obj.Objective, tree) -> set[str] | None:
    """Return the sequence-weight definitions to print as min(ρ, clip) in the objective, or None.

    `rho.clip` caps the product of a term's sequence-weight factors, so
    wrapping a call is exact only when every weighted term's sequence weight
    is one definition called in the objective, and every sequence-weight
    definition called there is such a weight. Otherwise (inline weights,
    products of weights, powers of a weight) the result is None and the
    sentence under the formula states the clip.
    """
    sequence_definitions = {name for name, d in objective.definitions.items() if d.kind == "sequence"}
    called = {
        node.args[0].name for node in sympy.preorder_traversal(tree)
        if isinstance(node, UserCall) and node.args[0].name in sequence_definitions
    }
    matched: set[str] = set()
    for term in objective.terms:
        if term.sequence_weight is None:
            continue
        weight = term.sequence_weight.expr
        name = next((n for n in sorted(called) if _same_weight(objective.definitions[n].body, weight)), None)
        if name is None:
            return None
        matched.add(name)
    return matched if matched == called else None


def _same_weight(body: sympy.Expr, weight: sympy.Expr) -> bool:
    # The checker merges a term's sequence factors with powsimp, so the body is compared in that form too.
    return body == weight or sympy.powsimp(body, combine="exp", deep=True) == weight


def _wrap_calls(tree, names: set[str], clip: NumberLiteral):
    """Replace each call of a definition in `names` by min(call, clip), leaving the rest of the tree as built."""
    if isinstance(tree, UserCall) and tree.args[0].name in names:
        return MathCall(Name("min"), tree, clip)
    if isinstance(tree, _Construct):
        return tree.func(*(_wrap_calls(arg, names, clip) for arg in tree.args))
    return tree


def _syntax(objective: obj.Objective) -> ast.Spec:
    if objective.syntax is not None:
        return objective.syntax
    if objective.source_text:
        from kdsl.parse import parse

        return parse(objective.source_text, objective.path)
    raise ValueError("kdsl.latex.render needs an objective from kdsl.load (with its parsed spec or source text); "
                     "this one was built by hand")


def _user_definitions(spec: ast.Spec, settings: dict) -> dict[str, ast.Definition]:
    definitions = {}
    for statement in spec.statements:
        if isinstance(statement, ast.Definition):
            definitions[statement.name.id] = statement
        elif isinstance(statement, ast.Assignment) and statement.target.id != "objective" and statement.target.id not in settings:
            definitions[statement.target.id] = ast.Definition(statement.target, (), statement.value, statement.span)
    return definitions


def _used_definitions(root, user: dict[str, ast.Definition]) -> set[str]:
    used: set[str] = set()
    pending = [root]
    while pending:
        for node in ast.walk(pending.pop()):
            if isinstance(node, ast.Name) and node.id in user and node.id not in used:
                used.add(node.id)
                pending.append(user[node.id].body)
    return used


def render(objective: obj.Objective, standalone: bool = False) -> str:
    """Render the objective and the definitions it uses as LaTeX, in the user's term order.

    The result is an `align*` block followed by a sentence that names the
    reduction in force. With `standalone=True` it is a complete document
    that pdflatex compiles.
    """
    tree, definitions = build(objective)
    printer = LatexPrinter()
    lines = [r"\mathcal{L}(\theta) &= " + _objective_lines(printer, tree)]
    for head, body in definitions:
        lines.append(printer.doprint(head) + " &= " + printer.doprint(body))
    body = "\\begin{align*}\n  " + " \\\\\n  ".join(lines) + "\n\\end{align*}\n" + _where_sentence(objective, tree) + "\n"
    path = "".join(ch if ch.isprintable() else "?" for ch in _ascii(objective.path)).replace("\\", "/")
    header = f"% kdsl objective from {path}, reduction: {objective.reduction}\n"
    if not standalone:
        return header + body
    return (header + "\\documentclass{article}\n\\usepackage{amsmath}\n\\usepackage{amssymb}\n"
            "\\begin{document}\n" + body + "\\end{document}\n")


def _objective_lines(printer: LatexPrinter, tree) -> str:
    """Print the objective, one top-level term per line when there are three or more."""
    terms = _top_level_terms(tree)
    if len(terms) < 3:
        return printer.doprint(tree)
    parts = []
    for index, (sign, term) in enumerate(terms):
        text = printer.paren(term, 11)
        if index == 0:
            parts.append(("-" if sign == "-" else "") + text)
        else:
            parts.append(f"&\\quad {sign} {text}")
    return " \\\\\n  ".join(parts)


def _top_level_terms(tree) -> list[tuple[str, sympy.Basic]]:
    if isinstance(tree, Plus):
        return _top_level_terms(tree.args[0]) + [("+", tree.args[1])]
    if isinstance(tree, Minus):
        return _top_level_terms(tree.args[0]) + [("-", tree.args[1])]
    return [("+", tree)]


def _where_sentence(objective: obj.Objective, tree) -> str:
    clauses = []
    nodes = list(sympy.preorder_traversal(tree))
    if any(isinstance(n, Name) and n.name == "CE" for n in nodes):
        clauses.append(r"$\mathrm{CE} = -\log q_\theta(w_t)$ is the cross-entropy of the ground-truth token")
    if any(isinstance(n, ProjectedCrossEntropy) for n in nodes):
        clauses.append(r"$\mathrm{CE}(o^{\rightarrow q}) = -\log o^{\rightarrow q}(w_t)$ is the cross-entropy of the ground-truth "
                       r"token under the teacher projected into the student's vocabulary")
    if _has_bare_terms(tree):
        clauses.append(r"a term outside $\mathbb{E}$ is an expectation under $w \sim d_{\mathrm{data}}$")
    clip = _sequence_clip(objective)
    if clip is not None and not _clipped_calls(objective, tree):  # the formula does not show the clip
        clauses.append("each term's sequence weight (the product of its factors that depend on the whole response $w$) "
                       rf"is applied clipped, as $\min(\cdot, {_format_setting(clip)})$")
    clauses.append(REDUCTION_SENTENCES.get(objective.reduction, f"reduction: {objective.reduction}"))
    if len(clauses) == 1:
        return "where " + clauses[0] + "."
    return "where " + ", ".join(clauses[:-1]) + ", and " + clauses[-1] + "."


def _has_bare_terms(tree) -> bool:
    """Return whether some loss of the objective is outside every expectation."""
    if isinstance(tree, Expectation):
        return False
    if isinstance(tree, (Divergence, FDivergence, Entropy, UniversalLogit, ProjectedCrossEntropy)):
        return True
    if isinstance(tree, Name) and tree.name == "CE":
        return True
    if isinstance(tree, UserCall):
        return False
    return any(_has_bare_terms(arg) for arg in tree.args)
