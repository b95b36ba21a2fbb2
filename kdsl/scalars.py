"""Evaluate the sympy expression of a `kdsl.objective.Scalar` on torch tensors.

The evaluator walks the sympy tree node by node and maps each node to one
torch operation. It never turns an expression into a string and back: no
`lambdify`, `eval`, `sympify` or `parse_expr`. Role symbols (`t`, `T`,
`log_o_wt`, `epoch`, ...) are bound to tensors or numbers by the caller.

Token and sequence weights are evaluated without gradient in float32
(`evaluate_weight`); schedules and constant coefficients are evaluated in
float64 and returned as Python floats (`evaluate_schedule`).
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import sympy
import torch
from torch import Tensor

from kdsl.errors import InternalError
from kdsl.objective import EPOCH, PROGRESS, STEP, Scalar

__all__ = ["evaluate", "evaluate_weight", "evaluate_schedule", "constant_value"]

Bindings = Mapping[sympy.Symbol, "Tensor | float | int"]


def evaluate(expr: sympy.Basic, bindings: Bindings, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """Evaluate `expr` with its free symbols bound to tensors or numbers.

    The result broadcasts the bound tensors; an expression without tensor
    bindings gives a 0-dim tensor. Raises InternalError for a symbol with
    no binding or a sympy node type the evaluator does not know.
    """
    walker = _Walker(bindings, dtype, device)
    return walker.value(expr)


def evaluate_weight(expr: sympy.Basic, bindings: Bindings) -> Tensor:
    """Evaluate a per-token or per-sequence weight in float32 without gradient."""
    detached = {
        symbol: value.detach().float() if isinstance(value, Tensor) else value
        for symbol, value in bindings.items()
    }
    with torch.no_grad():
        return evaluate(expr, detached, dtype=torch.float32)


def evaluate_schedule(scalar: Scalar | sympy.Basic, epoch: float = 0.0, step: int = 0, progress: float = 0.0) -> float:
    """Evaluate a constant or a schedule (over epoch, step, progress) to a float, in float64."""
    expr = scalar.expr if isinstance(scalar, Scalar) else scalar
    bindings = {EPOCH: float(epoch), STEP: float(step), PROGRESS: float(progress)}
    with torch.no_grad():
        return float(evaluate(expr, bindings, dtype=torch.float64))


def constant_value(expr: sympy.Basic) -> float | None:
    """Return the float value of an expression without free symbols, None if it has some."""
    if expr.free_symbols:
        return None
    return evaluate_schedule(expr)


# --- The walker ---------------------------------------------------------------------------


def _fold(function: Callable[[Tensor, Tensor], Tensor]) -> Callable[[list[Tensor]], Tensor]:
    def folded(values: list[Tensor]) -> Tensor:
        result = values[0]
        for value in values[1:]:
            result = function(result, value)
        return result

    return folded


# Sympy function classes that map to one elementwise torch function of one argument.
_UNARY: dict[type, Callable[[Tensor], Tensor]] = {
    sympy.exp: torch.exp,
    sympy.log: torch.log,
    sympy.Abs: torch.abs,
    sympy.sin: torch.sin,
    sympy.cos: torch.cos,
    sympy.tan: torch.tan,
    sympy.tanh: torch.tanh,
    sympy.sinh: torch.sinh,
    sympy.cosh: torch.cosh,
    sympy.atan: torch.atan,
    sympy.floor: torch.floor,
    sympy.ceiling: torch.ceil,
    sympy.sign: torch.sign,
}

# Sympy classes with any number of arguments folded left to right.
_NARY: dict[type, Callable[[list[Tensor]], Tensor]] = {
    sympy.Add: _fold(torch.add),
    sympy.Mul: _fold(torch.mul),
    sympy.Min: _fold(torch.minimum),
    sympy.Max: _fold(torch.maximum),
}

_RELATIONS: dict[type, Callable[[Tensor, Tensor], Tensor]] = {
    sympy.StrictLessThan: torch.lt,
    sympy.LessThan: torch.le,
    sympy.StrictGreaterThan: torch.gt,
    sympy.GreaterThan: torch.ge,
    sympy.Equality: torch.eq,
    sympy.Unequality: torch.ne,
}


class _Walker:
    """Map each sympy node to a torch operation, with the symbols bound by the caller."""

    def __init__(self, bindings: Bindings, dtype: torch.dtype, device):
        self.bindings = bindings
        self.dtype = dtype
        self.device = device
        if device is None:
            for value in bindings.values():
                if isinstance(value, Tensor):
                    self.device = value.device
                    break

    def constant(self, number: float) -> Tensor:
        return torch.tensor(number, dtype=self.dtype, device=self.device)

    def value(self, expr: sympy.Basic) -> Tensor:
        if isinstance(expr, sympy.Symbol):
            return self.symbol(expr)
        if isinstance(expr, (sympy.Number, sympy.NumberSymbol)):
            return self.constant(float(expr))
        if isinstance(expr, sympy.Pow):
            return self.power(expr)
        if isinstance(expr, sympy.Piecewise):
            return self.piecewise(expr)
        for kind, function in _NARY.items():
            if isinstance(expr, kind):
                return function([self.value(arg) for arg in expr.args])
        for kind, function in _UNARY.items():
            if isinstance(expr, kind):
                return self.unary(expr, function)
        raise InternalError(
            f"the scalar evaluator has no torch operation for the sympy node {type(expr).__name__} "
            f"in the expression {expr}"
        )

    def symbol(self, symbol: sympy.Symbol) -> Tensor:
        if symbol not in self.bindings:
            bound = ", ".join(sorted(str(s) for s in self.bindings)) or "none"
            raise InternalError(f"the symbol {symbol} has no value here (bound symbols: {bound})")
        value = self.bindings[symbol]
        if isinstance(value, Tensor):
            return value.to(self.dtype)
        return self.constant(float(value))

    def unary(self, expr: sympy.Basic, function: Callable[[Tensor], Tensor]) -> Tensor:
        if len(expr.args) != 1:
            raise InternalError(f"{type(expr).__name__} with {len(expr.args)} arguments in {expr}; expected one")
        return function(self.value(expr.args[0]))

    def power(self, expr: sympy.Pow) -> Tensor:
        base, exponent = expr.args
        if exponent == sympy.Rational(1, 2):
            return torch.sqrt(self.value(base))
        if exponent == -1:
            return torch.reciprocal(self.value(base))
        if base == sympy.E:
            return torch.exp(self.value(exponent))
        return torch.pow(self.value(base), self.value(exponent))

    def piecewise(self, expr: sympy.Piecewise) -> Tensor:
        # Fold from the last branch back so the first true condition wins, as in sympy.
        result = None
        for branch_value, condition in reversed(expr.args):
            value = self.value(branch_value)
            if condition == sympy.true:
                result = value
                continue
            chosen = self.condition(condition)
            if result is None:
                result = torch.where(chosen, value, self.constant(math.nan))
            else:
                result = torch.where(chosen, value, result)
        return result

    def condition(self, condition: sympy.Basic) -> Tensor:
        if condition == sympy.true:
            return torch.tensor(True, device=self.device)
        if condition == sympy.false:
            return torch.tensor(False, device=self.device)
        for kind, relation in _RELATIONS.items():
            if isinstance(condition, kind):
                left, right = condition.args
                return relation(self.value(left), self.value(right))
        if isinstance(condition, sympy.And):
            return _fold(torch.logical_and)([self.condition(arg) for arg in condition.args])
        if isinstance(condition, sympy.Or):
            return _fold(torch.logical_or)([self.condition(arg) for arg in condition.args])
        if isinstance(condition, sympy.Not):
            return torch.logical_not(self.condition(condition.args[0]))
        raise InternalError(
            f"the scalar evaluator has no torch operation for the condition {type(condition).__name__} "
            f"in {condition}"
        )
