"""Sympy building blocks for the checker: numbers, math functions, numeric probing and proofs.

Every sympy object here is built from parse-tree nodes with sympy's
constructors. No string from a spec is passed to `sympify`, `parse_expr`,
`eval` or `lambdify`; the numeric evaluator below walks the expression tree
itself.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import sympy

from kdsl import objective as obj


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


def domain(settings: dict) -> dict[sympy.Symbol, tuple[float, float]]:
    """Return the range of each role symbol under these settings, used to probe weights."""
    max_length = max(int(settings.get("data.max_response_tokens", 64)), int(settings.get("sgo.max_new_tokens", 64)))
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


def probe_points(symbols: list[sympy.Symbol], ranges: dict, per_axis: int = 9, limit: int = 4096) -> dict:
    """Return probe points covering each symbol's range: endpoints, a grid and a few random points."""
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


def find_negative(expr: sympy.Expr, ranges: dict) -> tuple[bool, dict | None]:
    """Try to prove `expr >= 0` over `ranges`; return (proved, a point where it is negative or None)."""
    if expr.is_nonnegative or interval_nonnegative(expr, ranges):
        return True, None
    symbols = sorted(expr.free_symbols, key=lambda s: s.name)
    if not symbols:
        value = float(expr)
        return value >= 0, (None if value >= 0 else {"value": value})
    points = probe_points(symbols, ranges)
    values = evaluate_numeric(expr, points)
    negative = np.flatnonzero(values < -1e-12)
    if negative.size:
        i = negative[0]
        point = {symbol: float(points[symbol][i]) for symbol in symbols}
        point["value"] = float(values[i])
        return False, point
    return False, None


LOG_PROBABILITY_ROLES = {obj.LOG_O_TOKEN, obj.LOG_Q_TOKEN, obj.LOG_O_SEQ, obj.LOG_Q_SEQ, obj.LOG_REF_SEQ}


def interval_nonnegative(expr: sympy.Expr, ranges: dict) -> bool:
    """Prove `expr >= 0` by interval arithmetic: each symbol replaced by its whole range at once.

    The bound is conservative (a symbol used twice widens it), so False means
    "not proved", never "negative".
    """
    bounds = {}
    for symbol in expr.free_symbols:
        if symbol not in ranges:
            return False
        low, high = ranges[symbol]
        if symbol in LOG_PROBABILITY_ROLES:
            low = -sympy.oo
        bounds[symbol] = sympy.AccumBounds(low, high)
    try:
        value = expr.xreplace(bounds)
        if isinstance(value, sympy.AccumBounds):
            return bool(value.min >= 0)
        return bool(value.is_nonnegative)
    except (TypeError, ValueError, NotImplementedError, AttributeError):
        return False


def in_unit_interval(expr: sympy.Expr, ranges: dict) -> tuple[bool, dict | None]:
    """Check 0 <= expr <= 1 over `ranges`; return (proved or unrefuted, a violating point or None)."""
    proved_low, low_point = find_negative(expr, ranges)
    if low_point is not None:
        return False, low_point
    proved_high, high_point = find_negative(1 - expr, ranges)
    if high_point is not None:
        high_point["value"] = 1 - high_point["value"]
        return False, high_point
    return True, None


def format_point(point: dict) -> str:
    """Render a probe point as `t = 101, epoch = 0.5`."""
    parts = []
    for symbol, value in point.items():
        if symbol == "value":
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


def is_zero(expr: sympy.Expr) -> bool:
    """Return whether sympy can show `expr` is identically zero."""
    simplified = sympy.simplify(expr)
    return simplified == 0


def finite_float(expr: sympy.Expr) -> float | None:
    """Return `expr` as a float when it is a finite constant, else None."""
    if expr.free_symbols:
        return None
    value = float(expr)
    return value if math.isfinite(value) else None
