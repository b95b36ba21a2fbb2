"""Numerically stable per-position kernels that every compiled loss is built from.

Every kernel takes log-probabilities, reduces over the last dimension (the
vocabulary) and keeps the leading dimensions, so a (B, T, V) input gives a
(B, T) output. Inputs of any floating dtype are upcast and the result is
always float32.

Conventions:

- 0·log 0 = 0. A vocabulary entry with probability 0 on the weighting side
  (a -inf log-probability) contributes 0 and receives a zero gradient, never
  NaN. Masks are applied with the double-`where` pattern: the masked operand
  is replaced by a harmless constant *before* the unsafe operation, so its
  backward pass never produces inf or NaN.
- A divergence that is truly infinite (KL(a ‖ b) with a > 0 where b = 0) is
  +inf, not NaN; the infinite entries carry no gradient.
- Mixtures are formed from probabilities in log space (a log-sum-exp over
  `log w_i + log p_i`), never by mixing log-probabilities.
- A temperature divides the logits; nothing is scaled by τ².

Two paths compute each of `kl`, `cross_entropy`, `entropy` and
`log_mixture`. When every input entry is finite (the common case, checked
with one sum per input), a custom autograd function evaluates the plain
formula and its analytic gradient, with no masks. Otherwise the masked
path above runs. The two paths agree to rounding, in values and
gradients. The `finite` argument lets a caller that has already checked
its inputs skip the check (True) or force the masked path (False).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "all_finite",
    "log_softmax",
    "log_mixture",
    "kl",
    "cross_entropy",
    "entropy",
    "total_variation",
    "js",
    "skew_kl",
    "skew_reverse_kl",
    "f_divergence",
    "token_nll",
    "uld",
]

NEG_INF = float("-inf")
POS_INF = float("inf")


# --- Input checks -----------------------------------------------------------------------


def _as_float32(name: str, logp: Tensor) -> Tensor:
    if not isinstance(logp, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of log-probabilities, got {type(logp).__name__}")
    if not logp.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor of log-probabilities, got dtype {logp.dtype}")
    if logp.dim() == 0:
        raise ValueError(f"{name} must have a vocabulary dimension (the last one), got a 0-dim tensor")
    return logp.float()


def _same_vocabulary(function: str, logp_a: Tensor, logp_b: Tensor) -> tuple[Tensor, Tensor]:
    a = _as_float32("logp_a", logp_a)
    b = _as_float32("logp_b", logp_b)
    if a.shape != b.shape:
        raise ValueError(
            f"{function}: logp_a has shape {tuple(a.shape)} but logp_b has shape {tuple(b.shape)}; "
            "both must score the same positions over the same vocabulary "
            "(project one side with o→q or q→o, or use ULD for different vocabularies)"
        )
    return a, b


def _check_temperature(temperature: float | Tensor) -> None:
    if isinstance(temperature, Tensor):
        if temperature.dim() != 0:
            raise ValueError(f"temperature must be a float or a 0-dim tensor, got shape {tuple(temperature.shape)}")
        if not bool(torch.isfinite(temperature)) or not bool(temperature > 0):
            raise ValueError(f"temperature must be finite and > 0, got {temperature.item()}")
        return
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float or a 0-dim tensor, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")


# --- Distributions ----------------------------------------------------------------------


def log_softmax(
    logits: Tensor,
    temperature: float | Tensor | None = None,
    top_k: int | None = None,
) -> Tensor:
    """Turn logits into float32 log-probabilities over the last dimension.

    `temperature` divides the logits (no τ² factor anywhere). `top_k` keeps
    the k largest logits of each row (exactly k on ties), sets the others to
    -inf and renormalises; a k at least the vocabulary size keeps every entry.
    """
    x = _as_float32("logits", logits)
    if temperature is not None:
        _check_temperature(temperature)
        x = x / temperature

    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        if top_k < x.shape[-1]:
            kept = torch.topk(x, top_k, dim=-1).indices  # (..., k)
            keep_mask = torch.zeros_like(x, dtype=torch.bool).scatter(-1, kept, True)
            x = torch.where(keep_mask, x, NEG_INF)

    return torch.log_softmax(x, dim=-1)


def log_mixture(
    logps: Sequence[Tensor], weights: Sequence[float | Tensor], *, finite: bool | None = None,
) -> Tensor:
    """Compute log Σ_i w_i·p_i for a convex mixture of distributions given as log-probabilities.

    The mixture is formed from probabilities with a log-sum-exp. Float weights
    must be non-negative and sum to 1; a zero float weight drops its component.
    A tensor weight may be zero at run time: its log is taken behind a mask,
    so the gradient stays finite. An entry where every component has
    probability 0 gets log-probability -inf and a zero gradient.

    With float weights and finite inputs (`finite` as in the module summary)
    the result is finite too.
    """
    if len(logps) == 0:
        raise ValueError("log_mixture needs at least one component, got none")
    if len(logps) != len(weights):
        raise ValueError(f"log_mixture got {len(logps)} distributions but {len(weights)} weights; pass one weight each")
    _check_mixture_weights(weights)

    shape = _as_float32("logps[0]", logps[0]).shape
    components = []  # (log-probabilities, weight) of each kept component
    for i, (logp, weight) in enumerate(zip(logps, weights)):
        logp = _as_float32(f"logps[{i}]", logp)
        if logp.shape != shape:
            raise ValueError(
                f"log_mixture: logps[{i}] has shape {tuple(logp.shape)} but logps[0] has shape {tuple(shape)}; "
                "components must share one vocabulary"
            )
        if isinstance(weight, Tensor) or weight > 0:
            components.append((logp, weight))

    float_weights = all(not isinstance(weight, Tensor) for _, weight in components)
    if len(components) > 1 and float_weights and _use_fast_path(finite, *(logp for logp, _ in components)):
        return _FiniteLogMixture.apply(tuple(weight for _, weight in components), *(logp for logp, _ in components))

    shifted = []  # log w_i + log p_i, one tensor per kept component
    for logp, weight in components:
        if isinstance(weight, Tensor):
            shifted.append(logp + _safe_log_weight(weight))
        else:
            shifted.append(logp + math.log(weight))

    if len(shifted) == 1:
        return shifted[0]
    return _logsumexp_stack(torch.stack(shifted))  # (n, ...) -> (...)


def _check_mixture_weights(weights: Sequence[float | Tensor]) -> None:
    constants = []
    for i, weight in enumerate(weights):
        if isinstance(weight, Tensor):
            if weight.dim() != 0:
                raise ValueError(f"mixture weight {i} must be a float or a 0-dim tensor, got shape {tuple(weight.shape)}")
            continue
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise TypeError(f"mixture weight {i} must be a float or a 0-dim tensor, got {type(weight).__name__}")
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"mixture weight {i} must be finite and >= 0, got {weight}")
        constants.append(float(weight))
    if len(constants) == len(weights) and abs(sum(constants) - 1.0) > 1e-6:
        raise ValueError(f"mixture weights must sum to 1, got {constants} (sum {sum(constants)})")


def _safe_log_weight(weight: Tensor) -> Tensor:
    """log w for a 0-dim weight tensor, -inf at w = 0 with a zero (not NaN) gradient."""
    weight = weight.float()
    positive = weight > 0
    return torch.where(positive, torch.log(torch.where(positive, weight, 1.0)), NEG_INF)


def _logsumexp_stack(stacked: Tensor) -> Tensor:
    """Log-sum-exp over dimension 0 whose gradient stays finite where every input is -inf.

    `torch.logsumexp` returns -inf there, but its backward pass evaluates
    exp(-inf - (-inf)) = NaN.
    """
    peak = stacked.amax(dim=0).detach()
    peak = torch.where(torch.isfinite(peak), peak, 0.0)
    total = torch.exp(stacked - peak).sum(dim=0)
    nonzero = total > 0
    return torch.where(nonzero, peak + torch.log(torch.where(nonzero, total, 1.0)), NEG_INF)


# --- Divergences ------------------------------------------------------------------------


def _support_masks(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Return (a > 0, b > 0, and both masked log-probs) with zeros behind the masks."""
    a_pos = a > NEG_INF
    b_pos = b > NEG_INF
    both = a_pos & b_pos
    return a_pos, b_pos, torch.where(both, a, 0.0), torch.where(both, b, 0.0)


def kl(logp_a: Tensor, logp_b: Tensor, *, finite: bool | None = None) -> Tensor:
    """Compute KL(a ‖ b) = Σ_v a(v)·(log a(v) − log b(v)) per position.

    `a` is the distribution the expectation is taken under. Entries with
    a = 0 contribute 0 with a zero gradient; entries with a > 0 and b = 0
    make the row +inf (the true value), and those entries carry no gradient.
    """
    a, b = _same_vocabulary("kl", logp_a, logp_b)
    if _use_fast_path(finite, a, b):
        return _FiniteKL.apply(a, b)
    a_pos, _, a_safe, b_safe = _support_masks(a, b)
    both = a_pos & (b > NEG_INF)

    finite_part = torch.exp(a_safe) * (a_safe - b_safe)
    per_entry = torch.where(both, finite_part, torch.where(a_pos, POS_INF, 0.0))
    return per_entry.sum(dim=-1)


def cross_entropy(logp_a: Tensor, logp_b: Tensor, *, finite: bool | None = None) -> Tensor:
    """Compute H(a, b) = −Σ_v a(v)·log b(v) per position, with the KL's 0·log 0 conventions.

    This is KL(a ‖ b) + H(a), the quantity DistiLLM calls "forward KL" when
    `a` is the teacher.
    """
    a, b = _same_vocabulary("cross_entropy", logp_a, logp_b)
    if _use_fast_path(finite, a, b):
        return _FiniteCrossEntropy.apply(a, b)
    a_pos, _, a_safe, b_safe = _support_masks(a, b)
    both = a_pos & (b > NEG_INF)

    finite_part = -torch.exp(a_safe) * b_safe
    per_entry = torch.where(both, finite_part, torch.where(a_pos, POS_INF, 0.0))
    return per_entry.sum(dim=-1)


def entropy(logp_a: Tensor, *, finite: bool | None = None) -> Tensor:
    """Compute H(a) = −Σ_v a(v)·log a(v) per position; zero-probability entries contribute 0."""
    a = _as_float32("logp_a", logp_a)
    if _use_fast_path(finite, a):
        return _FiniteEntropy.apply(a)
    a_pos = a > NEG_INF
    a_safe = torch.where(a_pos, a, 0.0)
    return torch.where(a_pos, -torch.exp(a_safe) * a_safe, 0.0).sum(dim=-1)


def total_variation(logp_a: Tensor, logp_b: Tensor) -> Tensor:
    """Compute TV(a, b) = ½·Σ_v |a(v) − b(v)| per position, in [0, 1]."""
    a, b = _same_vocabulary("total_variation", logp_a, logp_b)
    return 0.5 * (torch.exp(a) - torch.exp(b)).abs().sum(dim=-1)


def js(logp_a: Tensor, logp_b: Tensor, beta: float | Tensor) -> Tensor:
    """Compute the generalised Jensen–Shannon divergence JS[β](a ‖ b) per position.

    JS[β](a ‖ b) = β·KL(a ‖ m) + (1 − β)·KL(b ‖ m) with m = β·a + (1 − β)·b,
    the convention of TRL's GKD and Liger's JSD with `a` the teacher. It is
    continuous in β and equals 0 at β = 0 and β = 1 (no jump to a plain KL).
    """
    a, b = _same_vocabulary("js", logp_a, logp_b)
    beta_value = _check_unit_interval("beta", beta)
    if beta_value is not None and beta_value in (0.0, 1.0):
        return _zero_rows(a, b)

    complement = 1.0 - beta
    finite = all_finite(a, b)
    log_m = log_mixture([a, b], [beta, complement], finite=finite)
    # With a tensor beta the mixture takes the masked path, so kl checks it instead of relying on the inputs' check.
    finite = finite and beta_value is not None
    return _weighted(beta, kl(a, log_m, finite=finite)) + _weighted(complement, kl(b, log_m, finite=finite))


def _zero_rows(*logps: Tensor) -> Tensor:
    """Zeros per position that stay attached to the autograd graph of the inputs (zero gradient)."""
    rows = [(torch.where(torch.isfinite(x), x, 0.0) * 0.0).sum(dim=-1) for x in logps]
    return sum(rows[1:], rows[0])


def _weighted(weight: float | Tensor, value: Tensor) -> Tensor:
    """weight·value, where a zero weight gives 0 even if value is +inf (0·inf would be NaN)."""
    if isinstance(weight, Tensor):
        return torch.where(weight > 0, weight * value, 0.0)
    return weight * value


def skew_kl(logp_a: Tensor, logp_b: Tensor, alpha: float | Tensor) -> Tensor:
    """Compute SKL[α](a ‖ b) = KL(a ‖ α·a + (1 − α)·b) per position (DistiLLM's skew KL, true-KL form)."""
    a, b = _same_vocabulary("skew_kl", logp_a, logp_b)
    _check_unit_interval("alpha", alpha)
    return _kl_to_mixture(a, b, alpha)


def skew_reverse_kl(logp_a: Tensor, logp_b: Tensor, alpha: float | Tensor) -> Tensor:
    """Compute SRKL[α](a ‖ b) = KL(b ‖ α·b + (1 − α)·a) per position (DistiLLM's skew reverse KL)."""
    a, b = _same_vocabulary("skew_reverse_kl", logp_a, logp_b)
    _check_unit_interval("alpha", alpha)
    return _kl_to_mixture(b, a, alpha)


def _kl_to_mixture(a: Tensor, b: Tensor, alpha: float | Tensor) -> Tensor:
    """Compute KL(a ‖ α·a + (1 − α)·b), checking once whether both inputs are finite."""
    finite = all_finite(a, b)
    log_m = log_mixture([a, b], [alpha, 1.0 - alpha], finite=finite)
    # With a tensor alpha the mixture takes the masked path, so kl checks it instead of relying on the inputs' check.
    return kl(a, log_m, finite=finite if not isinstance(alpha, Tensor) else None)


def _check_unit_interval(name: str, value: float | Tensor) -> float | None:
    """Check that a constant coefficient lies in [0, 1] and return it as a float (None for a tensor)."""
    if isinstance(value, Tensor):
        if value.dim() != 0:
            raise ValueError(f"{name} must be a float or a 0-dim tensor, got shape {tuple(value.shape)}")
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or a 0-dim tensor, got {type(value).__name__}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return float(value)


def f_divergence(
    logp_a: Tensor,
    logp_b: Tensor,
    f: Callable[[Tensor], Tensor],
    f_zero: float | None = None,
    f_inf_slope: float | None = None,
) -> Tensor:
    """Compute D_f(a ‖ b) = Σ_v b(v)·f(a(v)/b(v)) per position, for a convex f with f(1) = 0.

    `f` maps a float64 tensor of ratios to a tensor of the same shape. The
    ratio is computed in log space, exp(log a − log b), in float64. Entries
    where one side is zero use the limits of b·f(a/b):

    - a = 0 < b: b·f(0), with f(0) = lim_{t→0+} f(t). `f_zero` gives that
      limit; when it is None, f is called at 0, and a NaN there (0·log 0 in
      f(t) = t·log t) raises with the fix.
    - b = 0 < a: a·f'(∞), with f'(∞) = lim_{t→∞} f(t)/t (for example +inf
      for t·log t, ½ for ½·|t − 1|). The caller passes it as `f_inf_slope`
      (`math.inf` allowed); when it is None and such an entry exists, the
      call raises instead of guessing.
    - a = b = 0: 0.

    An infinite limit makes the row +inf, and such entries carry no gradient.

    NOTE: where |log a − log b| > 700 the float64 ratio overflows or
    underflows, so such entries (extreme logits) fall back to the limits
    above. The named kernels (`kl`, `js`, `total_variation`) have no such limit.
    """
    a, b = _same_vocabulary("f_divergence", logp_a, logp_b)
    a64, b64 = a.double(), b.double()
    a_pos, b_pos, a_safe, b_safe = _support_masks(a64, b64)
    both = a_pos & b_pos
    only_b = b_pos & ~a_pos
    only_a = a_pos & ~b_pos

    # Mask the log-ratio before exp so that an overflowing ratio never reaches autograd.
    log_ratio = a_safe - b_safe
    ratio_finite = both & (log_ratio.abs() < _MAX_LOG_RATIO)
    only_b = only_b | (both & (log_ratio <= -_MAX_LOG_RATIO))
    only_a = only_a | (both & (log_ratio >= _MAX_LOG_RATIO))
    ratio = torch.exp(torch.where(ratio_finite, log_ratio, 0.0))
    inner = torch.exp(b_safe) * f(ratio)
    per_entry = torch.where(ratio_finite, inner, 0.0)

    zero_limit = _generator_at_zero(f, f_zero, a64)
    b_safe_only = torch.where(only_b, b64, 0.0)
    per_entry = per_entry + _limit_term(only_b, b_safe_only, zero_limit)

    if bool(only_a.any()):
        if f_inf_slope is None:
            raise ValueError(
                f"f_divergence: {int(only_a.sum())} entries have b = 0 < a, where b·f(a/b) tends to a·f'(∞); "
                "pass f_inf_slope = lim_{t→∞} f(t)/t (math.inf for f(t) = t·log t)"
            )
        a_safe_only = torch.where(only_a, a64, 0.0)
        per_entry = per_entry + _limit_term(only_a, a_safe_only, float(f_inf_slope))

    return per_entry.sum(dim=-1).float()


# exp(700) is near the float64 maximum (about exp(709.8)).
_MAX_LOG_RATIO = 700.0


def _generator_at_zero(f: Callable[[Tensor], Tensor], f_zero: float | None, like: Tensor) -> float:
    if f_zero is not None:
        return float(f_zero)
    value = float(f(torch.zeros((), dtype=torch.float64, device=like.device)))
    if math.isnan(value):
        raise ValueError(
            "f_divergence: f(0) evaluates to NaN; pass f_zero = lim_{t→0+} f(t) "
            "(0 for f(t) = t·log t, math.inf for f(t) = -log t)"
        )
    return value


def _limit_term(mask: Tensor, log_weight: Tensor, limit: float) -> Tensor:
    """exp(log_weight)·limit on `mask`, +inf without gradient where the limit is infinite."""
    if math.isinf(limit):
        return torch.where(mask, limit, 0.0).to(log_weight.dtype)
    return torch.where(mask, torch.exp(log_weight) * limit, 0.0)


# --- Fast path for finite inputs --------------------------------------------------------
#
# Each function below computes a kernel's plain formula and its analytic gradient. They are exact only
# where every input entry is finite, and the public kernels call them only then. A backward pass with
# create_graph=True recomputes the probabilities from the saved inputs, so that double backward
# differentiates through them.


def all_finite(*tensors: Tensor) -> bool:
    """Return whether every entry of every tensor is finite, with one sum per tensor.

    The sum of the entries is finite exactly when no entry is ±inf or NaN, except where a
    sum of finite entries overflows. Then this returns False, and the caller takes the
    masked path, which is correct for any input.
    """
    with torch.no_grad():
        return all(bool(torch.isfinite(tensor.sum())) for tensor in tensors)


def _use_fast_path(finite: bool | None, *tensors: Tensor) -> bool:
    if finite is None:
        return all_finite(*tensors)
    return bool(finite)


def _probabilities(logp: Tensor, saved: Tensor) -> Tensor:
    """Return the saved e^logp, or recompute it where the backward pass builds a graph (double backward)."""
    return torch.exp(logp) if torch.is_grad_enabled() else saved


def _save_pair(ctx, a: Tensor, b: Tensor, p: Tensor) -> None:
    """Save e^a, and a and b only where d/da is needed, so that an `a` without gradient (a teacher) is freed early."""
    if ctx.needs_input_grad[0]:
        ctx.save_for_backward(p, a, b)
    else:
        ctx.save_for_backward(p)


def _saved_pair(ctx) -> tuple[Tensor, Tensor | None, Tensor | None]:
    p, *rest = ctx.saved_tensors
    a, b = rest if rest else (None, None)
    if a is not None:
        p = _probabilities(a, p)
    return p, a, b


class _FiniteKL(torch.autograd.Function):
    """KL(a ‖ b) per position for finite a, b: Σ e^a·(a − b). d/da = e^a·(a − b + 1), d/db = −e^a."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        p = torch.exp(a)
        _save_pair(ctx, a, b, p)
        return torch.sub(a, b).mul_(p).sum(dim=-1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        p, a, b = _saved_pair(ctx)
        g = grad.unsqueeze(-1)
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = (a - b + 1.0) * p * g
        if ctx.needs_input_grad[1]:
            grad_b = p * -g
        return grad_a, grad_b


class _FiniteCrossEntropy(torch.autograd.Function):
    """H(a, b) per position for finite a, b: −Σ e^a·b. d/da = −e^a·b, d/db = −e^a."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        p = torch.exp(a)
        _save_pair(ctx, a, b, p)
        return -(p * b).sum(dim=-1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        p, a, b = _saved_pair(ctx)
        g = grad.unsqueeze(-1)
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = p * b * -g
        if ctx.needs_input_grad[1]:
            grad_b = p * -g
        return grad_a, grad_b


class _FiniteEntropy(torch.autograd.Function):
    """H(a) per position for finite a: −Σ e^a·a. d/da = −e^a·(a + 1)."""

    @staticmethod
    def forward(ctx, a: Tensor) -> Tensor:
        p = torch.exp(a)
        ctx.save_for_backward(a, p)
        return -(p * a).sum(dim=-1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        a, p = ctx.saved_tensors
        p = _probabilities(a, p)
        return (a + 1.0) * p * -grad.unsqueeze(-1)


# Below this mixture probability the fast mixture recomputes an entry with a shifted log-sum-exp:
# e^-69 is far above the float32 subnormal range (below e^-87), where exp loses precision.
_SMALLEST_MIXTURE = 1e-30


class _FiniteLogMixture(torch.autograd.Function):
    """log Σ_i w_i·e^(l_i) for finite log-probabilities l_i and positive float weights w_i.

    The forward pass sums probabilities and takes one log. Entries whose sum falls below
    `_SMALLEST_MIXTURE` are recomputed as a log-sum-exp of l_i + log w_i. The gradient is
    d/dl_i = w_i·e^(l_i − m).
    """

    @staticmethod
    def forward(ctx, weights: tuple[float, ...], *logps: Tensor) -> Tensor:
        log_weights = tuple(math.log(weight) for weight in weights)
        total = torch.exp(logps[0]).mul_(weights[0])
        for logp, weight in zip(logps[1:], weights[1:]):
            total.add_(torch.exp(logp), alpha=weight)
        underflow = bool(total.amin() < _SMALLEST_MIXTURE) if total.numel() else False
        if underflow:
            small = total < _SMALLEST_MIXTURE
        result = total.log_()
        if underflow:
            shifted = torch.stack([logp[small] + log_weight for logp, log_weight in zip(logps, log_weights)])
            result[small] = torch.logsumexp(shifted, dim=0)
        ctx.log_weights = log_weights
        ctx.save_for_backward(*logps, result)
        return result

    @staticmethod
    def backward(ctx, grad: Tensor):
        *logps, result = ctx.saved_tensors
        grads = []
        for needed, logp, log_weight in zip(ctx.needs_input_grad[1:], logps, ctx.log_weights):
            grads.append(torch.exp(logp - result + log_weight) * grad if needed else None)
        return (None, *grads)


# --- Token-level losses -----------------------------------------------------------------


def token_nll(logp: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Compute −log p[label] per position, 0 where the label equals `ignore_index`."""
    logp = _as_float32("logp", logp)
    if not isinstance(labels, Tensor) or labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"labels must be an integer tensor, got {getattr(labels, 'dtype', type(labels).__name__)}")
    if labels.shape != logp.shape[:-1]:
        raise ValueError(
            f"token_nll: labels have shape {tuple(labels.shape)} but logp scores shape {tuple(logp.shape[:-1])}; "
            "labels must be aligned with the logits (the trainer shifts them)"
        )

    valid = labels != ignore_index
    vocab = logp.shape[-1]
    out_of_range = valid & ((labels < 0) | (labels >= vocab))
    if bool(out_of_range.any()):
        bad = int(labels[out_of_range][0])
        raise ValueError(
            f"token_nll: label {bad} is outside the vocabulary [0, {vocab}); "
            f"use {ignore_index} (ignore_index) for positions that are not scored"
        )

    safe_labels = torch.where(valid, labels, 0).long().unsqueeze(-1)  # (..., 1)
    picked = logp.gather(-1, safe_labels).squeeze(-1)  # (...)
    return torch.where(valid, -picked, 0.0)


def uld(
    logp_student: Tensor,
    logp_teacher: Tensor,
    temperature_student: float | Tensor | None = None,
    temperature_teacher: float | Tensor | None = None,
) -> Tensor:
    """Compute the universal logit distillation distance per position.

    ULD (Boizard et al., 2024) sorts each probability vector in descending
    order, pads the shorter vocabulary with zeros and takes the L1 distance:
    Σ_i |sort↓(p_s)_i − sort↓(p_t)_i|. The vocabularies may differ in size;
    the leading dimensions must match (align positions first).

    TRL's GOLD `ULDLoss` and DSKD's `UniversalLogitDistillation` compute the
    same per-position value; they differ in how positions are aligned and
    reduced. The optional temperatures re-scale each side's log-probabilities
    (log_softmax(log p / τ)), which equals softmax(z / τ) of the original
    logits, as GOLD's separate student and teacher temperatures do. DSKD uses
    none.
    """
    s = _as_float32("logp_student", logp_student)
    t = _as_float32("logp_teacher", logp_teacher)
    if s.shape[:-1] != t.shape[:-1]:
        raise ValueError(
            f"uld: student positions {tuple(s.shape[:-1])} differ from teacher positions {tuple(t.shape[:-1])}; "
            "align the sequences before calling uld"
        )
    if temperature_student is not None:
        s = log_softmax(s, temperature=temperature_student)
    if temperature_teacher is not None:
        t = log_softmax(t, temperature=temperature_teacher)

    p_s = torch.exp(s).sort(dim=-1, descending=True).values
    p_t = torch.exp(t).sort(dim=-1, descending=True).values
    width = max(p_s.shape[-1], p_t.shape[-1])
    p_s = torch.nn.functional.pad(p_s, (0, width - p_s.shape[-1]))
    p_t = torch.nn.functional.pad(p_t, (0, width - p_t.shape[-1]))
    return (p_s - p_t).abs().sum(dim=-1)
