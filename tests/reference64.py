"""Float64 reference formulas for the per-position KD losses, written with numpy only.

These are deliberately independent of `kdsl.numerics`: distributions are
mixed in probability space (not with a log-sum-exp), every sum is an
explicit float64 numpy reduction, and nothing here imports torch. Tests use
them as ground truth where a peer implementation returns NaN or inf for a
finite quantity, and to check the kernels on random inputs.

Conventions are the kdsl ones: an entry whose log-probability is -inf has
probability 0 and contributes 0 when it is the weighting side; KL(a ‖ b) is
+inf when a > 0 and b = 0. All functions reduce over the last axis.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

NEG_INF = -np.inf


def to_float64(x) -> np.ndarray:
    """Convert a tensor or array to a float64 numpy array (detached, on the CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def log_softmax(logits, temperature: float | None = None, top_k: int | None = None) -> np.ndarray:
    """Compute float64 log-probabilities of `logits / temperature`, keeping the `top_k` largest."""
    z = to_float64(logits)
    if temperature is not None:
        z = z / float(temperature)
    if top_k is not None and top_k < z.shape[-1]:
        order = np.argsort(-z, axis=-1, kind="stable")
        dropped = order[..., top_k:]
        z = z.copy()
        np.put_along_axis(z, dropped, NEG_INF, axis=-1)
    peak = np.max(z, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore"):
        shifted = z - peak
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def mixture(parts: Sequence[tuple[float, np.ndarray]]) -> np.ndarray:
    """Compute log Σ w_i·p_i by adding probabilities (not log-probabilities) in float64."""
    total = np.zeros_like(to_float64(parts[0][1]))
    for weight, logp in parts:
        total = total + float(weight) * np.exp(to_float64(logp))
    with np.errstate(divide="ignore"):
        return np.log(total)


def kl(logp_a, logp_b) -> np.ndarray:
    """Compute Σ_v a·(log a − log b), 0 where a = 0 and +inf where a > 0 = b.

    An entry whose probability a underflows to 0 in float64 counts as a = 0:
    its true contribution is below 1e-300.
    """
    la, lb = to_float64(logp_a), to_float64(logp_b)
    a = np.exp(la)
    with np.errstate(invalid="ignore"):
        terms = np.where(lb == NEG_INF, np.inf, a * (la - lb))
    return np.where(a == 0.0, 0.0, terms).sum(axis=-1)


def cross_entropy(logp_a, logp_b) -> np.ndarray:
    """Compute −Σ_v a·log b, 0 where a = 0 and +inf where a > 0 = b."""
    la, lb = to_float64(logp_a), to_float64(logp_b)
    a = np.exp(la)
    positive = la > NEG_INF
    with np.errstate(invalid="ignore"):
        terms = np.where(positive, -a * np.where(positive, lb, 0.0), 0.0)
    terms = np.where(positive & (lb == NEG_INF), np.inf, terms)
    return terms.sum(axis=-1)


def entropy(logp_a) -> np.ndarray:
    """Compute −Σ_v a·log a with 0·log 0 = 0."""
    la = to_float64(logp_a)
    positive = la > NEG_INF
    safe = np.where(positive, la, 0.0)
    return np.where(positive, -np.exp(safe) * safe, 0.0).sum(axis=-1)


def total_variation(logp_a, logp_b) -> np.ndarray:
    """Compute ½·Σ_v |a − b|."""
    return 0.5 * np.abs(np.exp(to_float64(logp_a)) - np.exp(to_float64(logp_b))).sum(axis=-1)


def js(logp_a, logp_b, beta: float) -> np.ndarray:
    """Compute β·KL(a ‖ m) + (1 − β)·KL(b ‖ m) with m = β·a + (1 − β)·b (0 at β ∈ {0, 1})."""
    la, lb = to_float64(logp_a), to_float64(logp_b)
    if beta in (0.0, 1.0):
        return np.zeros(la.shape[:-1])
    log_m = mixture([(beta, la), (1.0 - beta, lb)])
    return beta * kl(la, log_m) + (1.0 - beta) * kl(lb, log_m)


def skew_kl(logp_a, logp_b, alpha: float) -> np.ndarray:
    """Compute KL(a ‖ α·a + (1 − α)·b)."""
    return kl(logp_a, mixture([(alpha, logp_a), (1.0 - alpha, logp_b)]))


def skew_reverse_kl(logp_a, logp_b, alpha: float) -> np.ndarray:
    """Compute KL(b ‖ α·b + (1 − α)·a)."""
    return kl(logp_b, mixture([(alpha, logp_b), (1.0 - alpha, logp_a)]))


def f_divergence(logp_a, logp_b, f: Callable[[float], float], f_zero: float, f_inf_slope: float) -> np.ndarray:
    """Compute Σ_v b·f(a/b) with the limits b·f(0) at a = 0 and a·f'(∞) at b = 0."""
    a, b = np.exp(to_float64(logp_a)), np.exp(to_float64(logp_b))
    out = np.zeros(a.shape[:-1])
    for index in np.ndindex(*a.shape[:-1]):
        total = 0.0
        for x, y in zip(a[index], b[index]):
            if x == 0.0 and y == 0.0:
                continue
            if y == 0.0:
                total += np.inf if np.isinf(f_inf_slope) else x * f_inf_slope
            elif x == 0.0:
                total += np.inf if np.isinf(f_zero) else y * f_zero
            else:
                total += y * f(x / y)
        out[index] = total
    return out


def token_nll(logp, labels, ignore_index: int = -100) -> np.ndarray:
    """Compute −log p[label] per position, 0 where the label is `ignore_index`."""
    lp = to_float64(logp)
    labels = np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels)
    out = np.zeros(labels.shape)
    for index in np.ndindex(*labels.shape):
        label = int(labels[index])
        if label != ignore_index:
            out[index] = -lp[index][label]
    return out


def uld(logp_student, logp_teacher) -> np.ndarray:
    """Compute Σ_i |sort↓(p_s)_i − sort↓(p_t)_i| with the shorter vocabulary padded by zeros."""
    ps = -np.sort(-np.exp(to_float64(logp_student)), axis=-1)
    pt = -np.sort(-np.exp(to_float64(logp_teacher)), axis=-1)
    width = max(ps.shape[-1], pt.shape[-1])
    pad = [(0, 0)] * (ps.ndim - 1)
    ps = np.pad(ps, pad + [(0, width - ps.shape[-1])])
    pt = np.pad(pt, pad + [(0, width - pt.shape[-1])])
    return np.abs(ps - pt).sum(axis=-1)
