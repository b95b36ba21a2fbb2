"""Sympy building blocks for the checker: numbers, math functions, numeric probing and proofs.

Every sympy object here is built from parse-tree nodes with sympy's
constructors. No string from a spec is passed to `sympify`, `parse_expr`,
`eval` or `lambdify`; the numeric and interval evaluators below walk the
expression tree themselves.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import sympy

from kdsl import objective as obj
from kdsl.printing import format_scalar


def number(text: str) -> sympy.Rational:
    """Return the exact rational value of a numeric literal (`3e-4` is 3/10000)."""
    value = Fraction(text)
    if value.denominator == 1:
        return sympy.Integer(value.numerator)
    return sympy.Rational(value.numerator, value.denominator)


def constant(value: float | int) -> sympy.Expr:
    """Return a setting's numeric value as an exact sympy number."""
    if isinstance(value, bool):
        return sympy.Integer(int(value))
    if isinstance(value, int):
        return sympy.Integer(value)
    fraction = Fraction(repr(float(value)))
    return sympy.Rational(fraction.numerator, fraction.denominator)


def _sigmoid(x):
    return 1 / (1 + sympy.exp(-x))


def _clip(x, low, high):
    return sympy.Min(sympy.Max(x, low), high)


def _where(condition, if_true, if_false):
    return sympy.Piecewise((if_true, condition), (if_false, True))


# Functions a definition body may call, with their arity (None: two or more).
MATH_FUNCTIONS = {
    "exp": (sympy.exp, 1),
    "log": (sympy.log, 1),
    "sqrt": (sympy.sqrt, 1),
    "abs": (sympy.Abs, 1),
    "cos": (sympy.cos, 1),
    "sin": (sympy.sin, 1),
    "tanh": (sympy.tanh, 1),
    "sigmoid": (_sigmoid, 1),
    "min": (sympy.Min, None),
    "max": (sympy.Max, None),
    "clip": (_clip, 3),
    "where": (_where, 3),
}

MATH_CONSTANTS = {"π": sympy.pi}

_NUMERIC_FUNCTIONS = {
    sympy.exp: np.exp,
    sympy.log: np.log,
    sympy.Abs: np.abs,
    sympy.cos: np.cos,
    sympy.sin: np.sin,
    sympy.tanh: np.tanh,
}

# Every sympy class a checked scalar may contain; the evaluators of kdsl handle each one.
SUPPORTED_NODES = (
    sympy.Symbol, sympy.Number, sympy.NumberSymbol, sympy.Add, sympy.Mul, sympy.Pow, sympy.Min, sympy.Max,
    sympy.Piecewise, sympy.exp, sympy.log, sympy.Abs, sympy.cos, sympy.sin, sympy.tanh,
)


def unsupported_node(expr: sympy.Basic) -> sympy.Basic | None:
    """Return the first sub-expression kdsl cannot evaluate numerically, or None."""
    for node in sympy.preorder_traversal(expr):
        if isinstance(node, (sympy.logic.boolalg.Boolean, sympy.core.relational.Relational, sympy.Tuple)):
            continue
        if not isinstance(node, SUPPORTED_NODES):
            return node
    return None


def evaluate_numeric(expr: sympy.Expr, values: dict[sympy.Symbol, np.ndarray]) -> np.ndarray:
    """Evaluate `expr` element-wise on float64 arrays by walking its tree."""
    with np.errstate(all="ignore"):
        return np.asarray(_numeric(expr, values), dtype=np.float64)


def _numeric(expr, values):
    if expr in values:
        return values[expr]
    if expr.is_Number or expr in (sympy.pi, sympy.E):
        return float(expr)
    if isinstance(expr, sympy.Add):
        return sum(_numeric(arg, values) for arg in expr.args)
    if isinstance(expr, sympy.Mul):
        result = 1.0
        for arg in expr.args:
            result = result * _numeric(arg, values)
        return result
    if isinstance(expr, sympy.Pow):
        return np.power(_numeric(expr.base, values), _numeric(expr.exp, values))
    if isinstance(expr, sympy.Min):
        return np.minimum.reduce([np.broadcast_to(_numeric(a, values), _shape(values)) for a in expr.args])
    if isinstance(expr, sympy.Max):
        return np.maximum.reduce([np.broadcast_to(_numeric(a, values), _shape(values)) for a in expr.args])
    if isinstance(expr, sympy.Piecewise):
        result = np.full(_shape(values), np.nan)
        decided = np.zeros(_shape(values), dtype=bool)
        for piece, condition in expr.args:
            holds = np.broadcast_to(_condition(condition, values), _shape(values)) & ~decided
            result = np.where(holds, np.broadcast_to(_numeric(piece, values), _shape(values)), result)
            decided |= holds
        return result
    if expr.func in _NUMERIC_FUNCTIONS:
        return _NUMERIC_FUNCTIONS[expr.func](_numeric(expr.args[0], values))
    raise TypeError(f"no numeric evaluation for {expr.func.__name__}")


def _condition(condition, values):
    if condition is sympy.true or condition == True:  # noqa: E712 - sympy's true is not Python's True
        return np.ones(_shape(values), dtype=bool)
    if condition is sympy.false:
        return np.zeros(_shape(values), dtype=bool)
    if isinstance(condition, sympy.And):
        return np.logical_and.reduce([np.broadcast_to(_condition(c, values), _shape(values)) for c in condition.args])
    if isinstance(condition, sympy.Or):
        return np.logical_or.reduce([np.broadcast_to(_condition(c, values), _shape(values)) for c in condition.args])
    if isinstance(condition, sympy.Not):
        return np.logical_not(_condition(condition.args[0], values))
    left, right = _numeric(condition.lhs, values), _numeric(condition.rhs, values)
    comparisons = {
        sympy.StrictLessThan: np.less, sympy.LessThan: np.less_equal,
        sympy.StrictGreaterThan: np.greater, sympy.GreaterThan: np.greater_equal,
        sympy.Equality: np.equal, sympy.Unequality: np.not_equal,
    }
    return comparisons[type(condition)](left, right)


def _shape(values):
    for array in values.values():
        return np.shape(array)
    return ()


def max_position(settings: dict) -> int:
    """Return the largest response position t: the longer of dataset responses and generated ones."""
    return max(int(settings.get("data.max_response_tokens", 64)), int(settings.get("sgo.max_new_tokens", 64)))


def domain(settings: dict) -> dict[sympy.Symbol, tuple[float, float]]:
    """Return the range of each role symbol under these settings, used to prove and probe weights."""
    max_length = max_position(settings)
    epochs = float(settings.get("train.epochs", 1.0)) or 1.0
    max_steps = int(settings.get("train.max_steps", 0)) or 100_000
    return {
        obj.POSITION: (1, max_length),
        obj.LENGTH: (1, max_length),
        obj.EPOCH: (0.0, epochs),
        obj.STEP: (0, max_steps),
        obj.PROGRESS: (0.0, 1.0),
        obj.LOG_O_TOKEN: (-30.0, 0.0),
        obj.LOG_Q_TOKEN: (-30.0, 0.0),
        obj.LOG_O_SEQ: (-500.0, 0.0),
        obj.LOG_Q_SEQ: (-500.0, 0.0),
        obj.LOG_REF_SEQ: (-500.0, 0.0),
    }


INTEGER_ROLES = {obj.POSITION, obj.LENGTH, obj.STEP}
LOG_PROBABILITY_ROLES = {obj.LOG_O_TOKEN, obj.LOG_Q_TOKEN, obj.LOG_O_SEQ, obj.LOG_Q_SEQ, obj.LOG_REF_SEQ}
# Slack for rounding in the float interval bounds: a bound within this of 0 or 1 counts as met.
TOLERANCE = 1e-12


def probe_points(symbols: list[sympy.Symbol], ranges: dict, per_axis: int = 9, limit: int = 4096) -> dict:
    """Return probe points covering each symbol's range: endpoints, a grid and a few interior points."""
    axes = []
    for symbol in symbols:
        low, high = ranges.get(symbol, (-10.0, 10.0))
        grid = np.linspace(low, high, per_axis)
        if symbol in INTEGER_ROLES:
            grid = np.unique(np.round(grid))
        extra = [low + (high - low) * f for f in (0.001, 0.01, 0.1, 0.5, 0.99)]
        axis = np.unique(np.concatenate([grid, np.round(extra) if symbol in INTEGER_ROLES else extra]))
        axes.append(axis)
    combos = list(itertools.product(*axes)) if axes else [()]
    if len(combos) > limit:
        rng = np.random.default_rng(0)
        keep = rng.choice(len(combos), size=limit, replace=False)
        combos = [combos[i] for i in sorted(keep)]
    columns = np.array(combos, dtype=np.float64).reshape(len(combos), len(symbols))
    return {symbol: columns[:, i] for i, symbol in enumerate(symbols)}


# --- interval bounds ------------------------------------------------------------------------


def bounds(expr: sympy.Expr, ranges: dict) -> tuple[float, float]:
    """Return a conservative interval [low, high] containing every value of `expr` over `ranges`.

    Each symbol is replaced by its whole range at once, so a symbol used twice
    widens the bound (x - x gives [-w, w]). The result is sound up to float
    rounding: the true values never leave it by more than TOLERANCE. Unknown
    nodes give (-inf, inf).
    """
    with np.errstate(all="ignore"):
        try:
            low, high = _bounds(expr, ranges)
        except (TypeError, ValueError, OverflowError, ZeroDivisionError):
            return -math.inf, math.inf
    if math.isnan(low) or math.isnan(high):
        return -math.inf, math.inf
    return low, high


def _bounds(expr, ranges) -> tuple[float, float]:
    if isinstance(expr, sympy.Symbol):
        if expr not in ranges:
            return -math.inf, math.inf
        low, high = ranges[expr]
        return float(low), float(high)
    if expr.is_Number or isinstance(expr, sympy.NumberSymbol):
        value = float(expr)
        return value, value

    if isinstance(expr, sympy.Add):
        parts = [_bounds(arg, ranges) for arg in expr.args]
        return sum(p[0] for p in parts), sum(p[1] for p in parts)
    if isinstance(expr, sympy.Mul):
        result = (1.0, 1.0)
        for arg in expr.args:
            result = _multiply(result, _bounds(arg, ranges))
        return result

    if isinstance(expr, sympy.Pow):
        return _power(expr, ranges)
    if isinstance(expr, (sympy.Min, sympy.Max)):
        parts = [_bounds(arg, ranges) for arg in expr.args]
        pick = min if isinstance(expr, sympy.Min) else max
        return pick(p[0] for p in parts), pick(p[1] for p in parts)
    if isinstance(expr, sympy.Piecewise):
        parts = [_bounds(piece, ranges) for piece, _ in expr.args]
        return min(p[0] for p in parts), max(p[1] for p in parts)

    if isinstance(expr, sympy.exp):
        low, high = _bounds(expr.args[0], ranges)
        return _exp(low), _exp(high)
    if isinstance(expr, sympy.log):
        low, high = _bounds(expr.args[0], ranges)
        if low < 0:
            return -math.inf, math.inf
        return (math.log(low) if low > 0 else -math.inf), (math.log(high) if high > 0 else -math.inf)
    if isinstance(expr, sympy.tanh):
        low, high = _bounds(expr.args[0], ranges)
        return math.tanh(low), math.tanh(high)

    if isinstance(expr, sympy.Abs):
        low, high = _bounds(expr.args[0], ranges)
        if low >= 0:
            return low, high
        if high <= 0:
            return -high, -low
        return 0.0, max(-low, high)
    if isinstance(expr, (sympy.cos, sympy.sin)):
        return _trig(expr, ranges)
    return -math.inf, math.inf


def _exp(x: float) -> float:
    if x > 709:
        return math.inf
    return math.exp(x)


def _multiply(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    products = []
    for x in a:
        for y in b:
            products.append(0.0 if (x == 0 or y == 0) else x * y)
    return min(products), max(products)


def _power(expr: sympy.Pow, ranges) -> tuple[float, float]:
    base_low, base_high = _bounds(expr.base, ranges)
    exponent = expr.exp
    if exponent.is_Integer:
        n = int(exponent)
        if n == 0:
            return 1.0, 1.0
        if n < 0:
            if base_low <= 0 <= base_high:
                return -math.inf, math.inf
            inverse = (1 / base_high, 1 / base_low)
            return _power_integer(inverse, -n)
        return _power_integer((base_low, base_high), n)
    if exponent.is_Number and base_low >= 0:
        p = float(exponent)
        values = [0.0 if b == 0 and p > 0 else b ** p for b in (base_low, base_high) if not (b == 0 and p < 0)]
        if base_low == 0 and p < 0:
            return min(values), math.inf
        return min(values), max(values)
    if base_low > 0:
        # b^e = exp(e·log b)
        log_bounds = (math.log(base_low), math.log(base_high) if base_high < math.inf else math.inf)
        exponent_bounds = _bounds(exponent, ranges)
        low, high = _multiply(log_bounds, exponent_bounds)
        return _exp(low), _exp(high)
    return -math.inf, math.inf


def _power_integer(base: tuple[float, float], n: int) -> tuple[float, float]:
    low, high = base
    candidates = [low ** n, high ** n]
    if n % 2 == 0 and low < 0 < high:
        return 0.0, max(candidates)
    return min(candidates), max(candidates)


def _trig(expr, ranges) -> tuple[float, float]:
    low, high = _bounds(expr.args[0], ranges)
    if not (math.isfinite(low) and math.isfinite(high)) or high - low >= 2 * math.pi:
        return -1.0, 1.0
    function = math.cos if isinstance(expr, sympy.cos) else math.sin
    values = [function(low), function(high)]
    # Include every extremum inside [low, high]: cos peaks at kπ, sin at π/2 + kπ.
    offset = 0.0 if isinstance(expr, sympy.cos) else math.pi / 2
    k = math.ceil((low - offset) / math.pi)
    while offset + k * math.pi <= high:
        values.append(function(offset + k * math.pi))
        k += 1
    return min(values), max(values)


# --- proofs and counterexamples --------------------------------------------------------------


def find_negative(expr: sympy.Expr, ranges: dict) -> tuple[bool, dict | None]:
    """Try to prove `expr >= 0` over `ranges`; return (proved, a point where it is negative or None)."""
    if expr.is_nonnegative or bounds(expr, ranges)[0] >= -TOLERANCE:
        return True, None
    if sympy.count_ops(expr) <= 40:
        simplified = sympy.simplify(expr)
        if simplified.is_nonnegative or bounds(simplified, ranges)[0] >= -TOLERANCE:
            return True, None
    symbols = sorted(expr.free_symbols, key=lambda s: s.name)
    if not symbols:
        value = float(expr)
        return value >= 0, (None if value >= 0 else {"value": value})
    points = probe_points(symbols, ranges)
    values = evaluate_numeric(expr, points)
    negative = np.flatnonzero(values < -TOLERANCE)
    if negative.size:
        i = negative[np.argmin(values[negative])] if len(symbols) > 1 else negative[0]
        point = {symbol: float(points[symbol][i]) for symbol in symbols}
        point["value"] = float(values[i])
        region = negative_region(expr < 0, symbols[0], ranges) if len(symbols) == 1 else None
        if region is not None:
            point["region"] = region
        return False, point
    return False, None


def interval_nonnegative(expr: sympy.Expr, ranges: dict) -> bool:
    """Return whether interval bounds prove `expr >= 0` over `ranges` (False means "not proved")."""
    return bounds(expr, ranges)[0] >= -TOLERANCE


def in_unit_interval(expr: sympy.Expr, ranges: dict) -> tuple[bool, dict | None]:
    """Check 0 <= expr <= 1 over `ranges`; return (proved, a violating point or None).

    (False, None) means neither proved nor refuted by probing.
    """
    low, high = bounds(expr, ranges)
    if low >= -TOLERANCE and high <= 1 + TOLERANCE:
        return True, None
    proved_low, low_point = find_negative(expr, ranges)
    if low_point is not None:
        return False, low_point
    proved_high, high_point = find_negative(1 - expr, ranges)
    if high_point is not None:
        high_point["value"] = 1 - high_point["value"]
        return False, high_point
    return proved_low and proved_high, None


def negative_region(condition, symbol: sympy.Symbol, ranges: dict) -> str | None:
    """Describe where a rational condition in one symbol is true over its range, as `t > 100`; None if unknown.

    Only rational functions are solved, because sympy's inequality solver can
    take very long on transcendental ones.
    """
    low, high = ranges.get(symbol, (-math.inf, math.inf))
    label = ROLE_LABELS.get(symbol, str(symbol))
    if symbol in LOG_PROBABILITY_ROLES:
        # Solve for the probability p = exp(log p), which is how users write o(w_t) and q(w).
        probability = sympy.Symbol("p", positive=True)
        condition = condition.xreplace({sympy.exp(symbol): probability}).subs(symbol, sympy.log(probability))
        symbol, label = probability, PROBABILITY_LABELS[symbol]
        low, high = math.exp(low), math.exp(high)
    expr = condition.lhs - condition.rhs
    if not expr.is_rational_function(symbol) or sympy.count_ops(expr) > 40:
        return None
    try:
        solution = sympy.solvers.inequalities.solve_univariate_inequality(
            condition, symbol, relational=False, domain=sympy.Interval(low, high))
    except (NotImplementedError, ValueError, TypeError):
        return None
    return _describe_set(solution, label, low, high)


def _describe_set(solution, label: str, low: float, high: float) -> str | None:
    if isinstance(solution, sympy.Interval):
        parts = []
        if solution.start > low or solution.left_open:
            parts.append(f"{label} {'>' if solution.left_open else '>='} {_short_number(solution.start)}")
        if solution.end < high or solution.right_open:
            parts.append(f"{label} {'<' if solution.right_open else '<='} {_short_number(solution.end)}")
        return " and ".join(parts) if parts else f"every {label}"
    if isinstance(solution, sympy.Union):
        described = [_describe_set(part, label, low, high) for part in solution.args]
        return None if None in described else " or ".join(described)
    return None


def _short_number(value) -> str:
    number = float(value)
    return str(int(number)) if number.is_integer() else f"{number:g}"


def format_point(point: dict) -> str:
    """Render a probe point as `t = 101, epoch = 0.5`; log-probabilities show as probabilities."""
    parts = []
    for symbol, value in point.items():
        if symbol in ("value", "region"):
            continue
        if symbol in LOG_PROBABILITY_ROLES:
            label = PROBABILITY_LABELS[symbol]
            parts.append(f"{label} = {math.exp(value):.3g}")
            continue
        label = ROLE_LABELS.get(symbol, str(symbol))
        shown = f"{value:g}" if not float(value).is_integer() else str(int(value))
        parts.append(f"{label} = {shown}")
    return ", ".join(parts)


ROLE_LABELS = {
    obj.POSITION: "t",
    obj.LENGTH: "T",
    obj.EPOCH: "epoch",
    obj.STEP: "step",
    obj.PROGRESS: "progress",
    obj.LOG_O_TOKEN: "log o(w_t)",
    obj.LOG_Q_TOKEN: "log q(w_t)",
    obj.LOG_O_SEQ: "log o(w)",
    obj.LOG_Q_SEQ: "log q(w)",
    obj.LOG_REF_SEQ: "log ref(w)",
}

PROBABILITY_LABELS = {
    obj.LOG_O_TOKEN: "o(w_t)",
    obj.LOG_Q_TOKEN: "q(w_t)",
    obj.LOG_O_SEQ: "o(w)",
    obj.LOG_Q_SEQ: "q(w)",
    obj.LOG_REF_SEQ: "ref(w)",
}


def is_zero(expr: sympy.Expr, ranges: dict | None = None) -> bool:
    """Return whether sympy can show `expr` is identically zero.

    Cheap steps come first: expansion, then a numeric probe that refutes most
    non-zero expressions at once, and full simplification only for small
    expressions.
    """
    if expr == 0 or sympy.expand(expr) == 0:
        return True
    symbols = sorted(expr.free_symbols, key=lambda s: s.name)
    if not symbols:
        value = float(expr)
        return value == 0
    if ranges is not None:
        values = evaluate_numeric(expr, probe_points(symbols, ranges, per_axis=5, limit=256))
        if np.any(np.abs(values) > 1e-9):
            return False
    if sympy.count_ops(expr) > 200:
        return False
    return sympy.simplify(expr) == 0


def finite_float(expr: sympy.Expr) -> float | None:
    """Return `expr` as a float when it is a finite constant, else None."""
    if expr.free_symbols:
        return None
    try:
        value = float(expr)
    except (TypeError, OverflowError):
        return None
    return value if math.isfinite(value) else None


# --- sums over positions ----------------------------------------------------------------------


TOKEN_TO_SEQUENCE = {obj.LOG_O_TOKEN: obj.LOG_O_SEQ, obj.LOG_Q_TOKEN: obj.LOG_Q_SEQ}


def sum_over_positions(expr: sympy.Expr) -> tuple[sympy.Expr | None, str | None]:
    """Return Σ_{t=1}^{T} expr in closed form, or (None, the reason) when there is none.

    Terms linear in log o(w_t) or log q(w_t) sum to log o(w) or log q(w), the
    sequence log-probabilities. Terms over t, T, constants and schedules are
    summed by sympy. Anything else (o(w_t) outside a logarithm, a sum without
    a closed form) is rejected with the reason.
    """
    total = sympy.Integer(0)
    rest = sympy.Integer(0)
    for term in sympy.Add.make_args(sympy.expand_mul(expr)):
        token_symbols = term.free_symbols & set(TOKEN_TO_SEQUENCE)
        if not token_symbols:
            rest += term
            continue
        if len(token_symbols) > 1:
            return None, f"the term {format_scalar(term)} multiplies log-probabilities of the token w_t"
        (symbol,) = token_symbols
        coefficient = sympy.simplify(term / symbol)
        if coefficient.free_symbols & (obj.TOKEN_ROLES | {obj.POSITION}):
            return None, (f"the term {format_scalar(term)} is not a constant multiple of log {PROBABILITY_LABELS[symbol]}; "
                          "Σ sums log o(w_t), log q(w_t) and expressions of t and T")
        total += coefficient * TOKEN_TO_SEQUENCE[symbol]
    if rest.free_symbols & {obj.POSITION}:
        summed = sympy.summation(rest, (obj.POSITION, 1, obj.LENGTH))
    else:
        summed = rest * obj.LENGTH
    bad = unsupported_node(summed)
    if bad is not None:
        return None, (f"Σ of {format_scalar(rest)} over t = 1..T has no closed form that kdsl can evaluate "
                      f"(sympy gives {format_scalar(summed)})")
    return total + summed, None
