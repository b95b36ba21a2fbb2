"""Tests of the per-position kernels in kdsl.numerics against closed-form identities and float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference64 as ref
from kdsl import numerics as N

FAST = settings(max_examples=25, deadline=None)
NEG_INF = float("-inf")


# --- Strategies ------------------------------------------------------------------------


@st.composite
def logit_rows(draw, rows: int | None = None, vocab: int | None = None, allow_neginf: bool = True):
    """Logits of shape (rows, vocab) with moderate values and optional -inf entries (never a whole row)."""
    rows = rows or draw(st.integers(1, 3))
    vocab = vocab or draw(st.integers(2, 7))
    values = draw(st.lists(st.floats(-20, 20, allow_nan=False), min_size=rows * vocab, max_size=rows * vocab))
    logits = torch.tensor(values, dtype=torch.float32).reshape(rows, vocab)
    if allow_neginf:
        hidden = draw(st.lists(st.booleans(), min_size=rows * vocab, max_size=rows * vocab))
        mask = torch.tensor(hidden).reshape(rows, vocab)
        mask[:, draw(st.integers(0, vocab - 1))] = False  # keep one entry per row
        logits = logits.masked_fill(mask, NEG_INF)
    return logits


@st.composite
def logit_pairs(draw, allow_neginf: bool = True):
    rows = draw(st.integers(1, 3))
    vocab = draw(st.integers(2, 7))
    return draw(logit_rows(rows, vocab, allow_neginf)), draw(logit_rows(rows, vocab, allow_neginf))


def _grad(loss: torch.Tensor, *leaves: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss.sum(), leaves))


def _close(actual: torch.Tensor, expected: np.ndarray, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    np.testing.assert_allclose(actual.detach().double().numpy(), expected, rtol=rtol, atol=atol)


# --- log_softmax -------------------------------------------------------------------------


def test_log_softmax_upcasts_to_float32():
    logits = torch.randn(2, 3, 5, dtype=torch.bfloat16)
    out = N.log_softmax(logits)
    assert out.dtype == torch.float32
    assert out.shape == (2, 3, 5)
    _close(out.exp().sum(-1), np.ones((2, 3)), atol=1e-6)


def test_log_softmax_temperature_divides_logits():
    logits = torch.tensor([[1.0, 2.0, 4.0]])
    expected = ref.log_softmax(logits, temperature=2.0)
    _close(N.log_softmax(logits, temperature=2.0), expected)
    _close(N.log_softmax(logits, temperature=torch.tensor(2.0)), expected)


def test_log_softmax_top_k_renormalises():
    logits = torch.tensor([[0.5, 3.0, 2.0, -1.0, 2.5]])
    out = N.log_softmax(logits, top_k=2)
    probs = out.exp()
    assert torch.isinf(out[0, [0, 2, 3]]).all()
    assert math.isclose(float(probs.sum()), 1.0, rel_tol=1e-6)
    _close(out, ref.log_softmax(logits, top_k=2))


def test_top_k_ties_keep_k():
    out = N.log_softmax(torch.zeros(1, 6), top_k=3)
    assert int(torch.isfinite(out).sum()) == 3


def test_top_k_above_vocab_noop():
    logits = torch.randn(2, 4)
    assert torch.equal(N.log_softmax(logits, top_k=9), N.log_softmax(logits))


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf"), float("nan")])
def test_log_softmax_rejects_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        N.log_softmax(torch.zeros(2, 3), temperature=temperature)


@pytest.mark.parametrize("top_k", [0, -2, 1.5, True])
def test_log_softmax_rejects_bad_top_k(top_k):
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        N.log_softmax(torch.zeros(2, 3), top_k=top_k)


def test_log_softmax_gradient_finite_with_neginf():
    logits = torch.tensor([[NEG_INF, 0.0, 1.0]], requires_grad=True)
    (grad,) = _grad(N.log_softmax(logits)[..., 1:], logits)
    assert torch.isfinite(grad).all()


# --- Identities ----------------------------------------------------------------------


@FAST
@given(logit_rows())
def test_kl_of_distribution_with_itself_is_zero(logits):
    logp = N.log_softmax(logits)
    assert torch.equal(N.kl(logp, logp), torch.zeros(logits.shape[0]))


@FAST
@given(logit_pairs(allow_neginf=False))
def test_kl_is_nonnegative(pair):
    a, b = (N.log_softmax(x) for x in pair)
    assert (N.kl(a, b) >= -1e-6).all()


@FAST
@given(logit_pairs())
def test_js_symmetric_at_half(pair):
    a, b = (N.log_softmax(x) for x in pair)
    _close(N.js(a, b, 0.5), N.js(b, a, 0.5).double().numpy(), atol=1e-6)


@FAST
@given(logit_pairs(), st.floats(0.01, 0.99))
def test_js_swaps_beta_with_arguments(pair, beta):
    a, b = (N.log_softmax(x) for x in pair)
    _close(N.js(a, b, beta), N.js(b, a, 1.0 - beta).double().numpy(), atol=1e-6)


@FAST
@given(logit_pairs(), st.floats(0.0, 1.0))
def test_js_bounded_by_its_entropy_limit(pair, beta):
    a, b = (N.log_softmax(x) for x in pair)
    value = N.js(a, b, beta)
    assert (value >= -1e-6).all()
    # JS[β] is at most the entropy of the mixing weights, h(β) = -β log β - (1-β) log(1-β).
    bound = -sum(w * math.log(w) for w in (beta, 1.0 - beta) if w > 0)
    assert (value <= bound + 1e-5).all()


@FAST
@given(logit_pairs())
def test_total_variation_in_unit_interval(pair):
    a, b = (N.log_softmax(x) for x in pair)
    value = N.total_variation(a, b)
    assert (value >= 0).all()
    assert (value <= 1 + 1e-6).all()


@FAST
@given(logit_pairs(allow_neginf=False))
def test_cross_entropy_is_kl_plus_entropy(pair):
    a, b = (N.log_softmax(x) for x in pair)
    expected = (N.kl(a, b) + N.entropy(a)).double().numpy()
    _close(N.cross_entropy(a, b), expected, atol=1e-4)


def test_js_endpoints_are_zero_with_gradient_path():
    s = torch.randn(2, 5, requires_grad=True)
    t = torch.randn(2, 5)
    for beta in (0.0, 1.0):
        value = N.js(N.log_softmax(t), N.log_softmax(s), beta)
        assert torch.equal(value, torch.zeros(2))
        (grad,) = _grad(value, s)
        assert torch.equal(grad, torch.zeros(2, 5))


def test_skew_kl_endpoints():
    a, b = N.log_softmax(torch.randn(3, 6)), N.log_softmax(torch.randn(3, 6))
    _close(N.skew_kl(a, b, 0.0), N.kl(a, b).double().numpy(), atol=1e-6)
    _close(N.skew_kl(a, b, 1.0), np.zeros(3), atol=1e-6)
    _close(N.skew_reverse_kl(a, b, 0.0), N.kl(b, a).double().numpy(), atol=1e-6)
    _close(N.skew_reverse_kl(a, b, 1.0), np.zeros(3), atol=1e-6)


# --- Agreement with float64 references ------------------------------------------------


@FAST
@given(logit_pairs(), st.floats(0.05, 0.95))
def test_kernels_match_float64_reference(pair, weight):
    a, b = (N.log_softmax(x) for x in pair)
    la, lb = ref.log_softmax(pair[0]), ref.log_softmax(pair[1])
    _close(N.kl(a, b), ref.kl(la, lb))
    _close(N.kl(b, a), ref.kl(lb, la))
    _close(N.cross_entropy(a, b), ref.cross_entropy(la, lb))
    _close(N.entropy(a), ref.entropy(la))
    _close(N.total_variation(a, b), ref.total_variation(la, lb))
    _close(N.js(a, b, weight), ref.js(la, lb, weight))
    _close(N.skew_kl(a, b, weight), ref.skew_kl(la, lb, weight))
    _close(N.skew_reverse_kl(a, b, weight), ref.skew_reverse_kl(la, lb, weight))
    _close(N.log_mixture([a, b], [weight, 1 - weight]), ref.mixture([(weight, la), (1 - weight, lb)]))


@FAST
@given(logit_rows(vocab=5), logit_rows(vocab=8))
def test_uld_matches_float64_reference(student, teacher):
    rows = min(student.shape[0], teacher.shape[0])
    student, teacher = student[:rows], teacher[:rows]
    value = N.uld(N.log_softmax(student), N.log_softmax(teacher))
    _close(value, ref.uld(ref.log_softmax(student), ref.log_softmax(teacher)))


def test_uld_temperatures_match_scaled_logits():
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 9)
    value = N.uld(N.log_softmax(student), N.log_softmax(teacher), temperature_student=2.0, temperature_teacher=0.5)
    expected = ref.uld(ref.log_softmax(student, 2.0), ref.log_softmax(teacher, 0.5))
    _close(value, expected)


def test_token_nll_matches_reference():
    logits = torch.randn(2, 4, 6)
    labels = torch.tensor([[1, -100, 5, 0], [-100, -100, 3, 2]])
    logp = N.log_softmax(logits)
    _close(N.token_nll(logp, labels), ref.token_nll(ref.log_softmax(logits), labels))
    assert N.token_nll(logp, labels)[0, 1] == 0


GENERATORS = {
    # name: (f on tensors, f on floats, f(0), f'(∞), matching kdsl kernel)
    "kl": (lambda t: t * torch.log(t), lambda t: t * math.log(t), 0.0, math.inf, lambda a, b: N.kl(a, b)),
    "reverse_kl": (lambda t: -torch.log(t), lambda t: -math.log(t), math.inf, 0.0, lambda a, b: N.kl(b, a)),
    "tv": (lambda t: 0.5 * (t - 1).abs(), lambda t: 0.5 * abs(t - 1), 0.5, 0.5, N.total_variation),
    "hellinger": (lambda t: (t.sqrt() - 1) ** 2, lambda t: (math.sqrt(t) - 1) ** 2, 1.0, 1.0, None),
}


@FAST
@given(logit_pairs(), st.sampled_from(sorted(GENERATORS)))
def test_f_divergence_matches_reference(pair, name):
    f_tensor, f_float, f_zero, slope, kernel = GENERATORS[name]
    a, b = (N.log_softmax(x) for x in pair)
    value = N.f_divergence(a, b, f_tensor, f_zero=f_zero, f_inf_slope=slope)
    la, lb = ref.log_softmax(pair[0]), ref.log_softmax(pair[1])
    _close(value, ref.f_divergence(la, lb, f_float, f_zero, slope), atol=1e-4)
    if kernel is not None:
        _close(value, kernel(a, b).double().numpy(), atol=1e-4)


def test_f_divergence_requires_slope_where_b_is_zero():
    a = N.log_softmax(torch.tensor([[0.0, 1.0, 2.0]]))
    b = N.log_softmax(torch.tensor([[0.0, NEG_INF, 2.0]]))
    with pytest.raises(ValueError, match="pass f_inf_slope"):
        N.f_divergence(a, b, lambda t: 0.5 * (t - 1).abs())


def test_f_divergence_rejects_nan_at_zero():
    a = N.log_softmax(torch.tensor([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="pass f_zero"):
        N.f_divergence(a, a, lambda t: t * torch.log(t))


def test_f_divergence_gradient_finite_at_zero_entries():
    s = torch.tensor([[0.0, NEG_INF, 2.0, 1.0]], requires_grad=True)
    t = torch.tensor([[1.0, 0.5, NEG_INF, 0.0]])
    value = N.f_divergence(N.log_softmax(t), N.log_softmax(s), lambda r: 0.5 * (r - 1).abs(), f_inf_slope=0.5)
    (grad,) = _grad(value, s)
    assert torch.isfinite(value).all()
    assert torch.isfinite(grad).all()


# --- Edge inputs: -inf and extreme logits ------------------------------------------------

KERNELS = {
    "kl_forward": lambda t, s: N.kl(t, s),
    "kl_reverse": lambda t, s: N.kl(s, t),
    "cross_entropy": lambda t, s: N.cross_entropy(t, s),
    "entropy": lambda t, s: N.entropy(s),
    "js_half": lambda t, s: N.js(t, s, 0.5),
    "js_tenth": lambda t, s: N.js(t, s, 0.1),
    "skew_kl": lambda t, s: N.skew_kl(t, s, 0.1),
    "skew_reverse_kl": lambda t, s: N.skew_reverse_kl(t, s, 0.1),
    "tv": lambda t, s: N.total_variation(t, s),
    "uld": lambda t, s: N.uld(s, t),
    "hellinger": lambda t, s: N.f_divergence(t, s, lambda r: (r.sqrt() - 1) ** 2, f_inf_slope=1.0),
}


def _extreme_logits(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(2, 3, 7, generator=generator) * 2
    teacher = torch.randn(2, 3, 7, generator=generator) * 2
    student[..., 0], teacher[..., 0] = 1e4, -1e4
    student[..., 3], teacher[..., 3] = -1e4, 1e4
    return student, teacher


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_extreme_logits_stay_finite(name):
    student, teacher = _extreme_logits(0)
    student.requires_grad_(True)
    value = KERNELS[name](N.log_softmax(teacher), N.log_softmax(student))
    (grad,) = _grad(value, student)
    assert torch.isfinite(value).all(), value
    assert torch.isfinite(grad).all()


def test_extreme_logits_match_reference():
    student, teacher = _extreme_logits(1)
    s, t = N.log_softmax(student), N.log_softmax(teacher)
    ls, lt = ref.log_softmax(student), ref.log_softmax(teacher)
    _close(N.kl(t, s), ref.kl(lt, ls))
    _close(N.kl(s, t), ref.kl(ls, lt))
    _close(N.js(t, s, 0.5), ref.js(lt, ls, 0.5))
    _close(N.skew_kl(t, s, 0.1), ref.skew_kl(lt, ls, 0.1))


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_shared_neginf_entries_give_finite_values(name):
    student = torch.tensor([[NEG_INF, 0.3, 1.0, NEG_INF, -2.0]], requires_grad=True)
    teacher = torch.tensor([[NEG_INF, 1.0, -0.5, NEG_INF, 0.0]])
    value = KERNELS[name](N.log_softmax(teacher), N.log_softmax(student))
    (grad,) = _grad(value, student)
    assert torch.isfinite(value).all()
    assert torch.isfinite(grad).all()


FINITE_ON_ANY_SUPPORT = ("js_half", "js_tenth", "skew_kl", "skew_reverse_kl", "tv", "uld", "entropy", "hellinger")


@settings(max_examples=20, deadline=None)
@given(logit_pairs())
def test_neginf_logits_keep_gradients_finite(pair):
    teacher, student = pair
    student = student.clone().requires_grad_(True)
    t = N.log_softmax(teacher)
    for name, kernel in KERNELS.items():
        value = kernel(t, N.log_softmax(student))
        if name in FINITE_ON_ANY_SUPPORT:
            assert torch.isfinite(value).all(), name
        (grad,) = _grad(value, student)
        assert torch.isfinite(grad).all(), name


def test_kl_infinite_where_support_is_missing():
    student = torch.tensor([[0.0, 1.0, 2.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, NEG_INF, 2.0]])
    reverse = N.kl(N.log_softmax(student), N.log_softmax(teacher))
    forward = N.kl(N.log_softmax(teacher), N.log_softmax(student))
    (grad,) = _grad(reverse + forward, student)
    assert float(reverse.detach()) == math.inf
    assert math.isfinite(float(forward.detach()))
    assert torch.isfinite(grad).all()


def test_teacher_neginf_forward_kl_finite_gradient():
    student = torch.randn(4, 6, requires_grad=True)
    teacher = torch.randn(4, 6)
    teacher[:, :2] = NEG_INF
    value = N.kl(N.log_softmax(teacher), N.log_softmax(student))
    (grad,) = _grad(value, student)
    _close(value, ref.kl(ref.log_softmax(teacher), ref.log_softmax(student.detach())))
    assert torch.isfinite(grad).all()


# --- log_mixture ------------------------------------------------------------------------


def test_log_mixture_zero_float_weight_dropped():
    a, b = N.log_softmax(torch.randn(2, 5)), N.log_softmax(torch.randn(2, 5))
    assert torch.equal(N.log_mixture([a, b], [1.0, 0.0]), a)


def test_log_mixture_zero_tensor_weight_has_finite_gradient():
    s = torch.randn(2, 5, requires_grad=True)
    t = torch.randn(2, 5)
    weight = torch.tensor(0.0)
    mix = N.log_mixture([N.log_softmax(t), N.log_softmax(s)], [weight, 1.0 - weight])
    value = N.kl(N.log_softmax(t), mix)
    (grad,) = _grad(value, s)
    _close(value, ref.kl(ref.log_softmax(t), ref.log_softmax(s.detach())))
    assert torch.isfinite(grad).all()


def test_log_mixture_empty_entry_neginf():
    s = torch.tensor([[NEG_INF, 0.0, 1.0]], requires_grad=True)
    t = torch.tensor([[NEG_INF, 2.0, 0.0]], requires_grad=True)
    mix = N.log_mixture([N.log_softmax(t), N.log_softmax(s)], [0.3, 0.7])
    assert mix[0, 0] == NEG_INF
    grads = _grad(mix[:, 1:], s, t)
    assert all(torch.isfinite(g).all() for g in grads)


def test_log_mixture_rejects_weights_not_summing_to_one():
    a = N.log_softmax(torch.randn(2, 5))
    with pytest.raises(ValueError, match="must sum to 1"):
        N.log_mixture([a, a], [0.5, 0.6])


def test_log_mixture_rejects_negative_weight():
    a = N.log_softmax(torch.randn(2, 5))
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        N.log_mixture([a, a], [1.5, -0.5])


# --- Fast path for finite inputs ----------------------------------------------------------

# Each kernel with a fast path, as a function of (teacher, student) log-probabilities and `finite`.
FAST_PATH_KERNELS = {
    "kl_forward": lambda t, s, finite: N.kl(t, s, finite=finite),
    "kl_reverse": lambda t, s, finite: N.kl(s, t, finite=finite),
    "cross_entropy": lambda t, s, finite: N.cross_entropy(t, s, finite=finite),
    "cross_entropy_student_first": lambda t, s, finite: N.cross_entropy(s, t, finite=finite),
    "entropy": lambda t, s, finite: N.entropy(s, finite=finite),
    "mixture_of_two": lambda t, s, finite: N.log_mixture([t, s], [0.3, 0.7], finite=finite).sum(dim=-1),
    "mixture_of_three": lambda t, s, finite: N.log_mixture([t, s, t.flip(-1)], [0.2, 0.5, 0.3], finite=finite).sum(dim=-1),
    "kl_to_mixture": lambda t, s, finite: N.kl(t, N.log_mixture([t, s], [0.1, 0.9], finite=finite), finite=finite),
}


def _grads_or_zeros(value: torch.Tensor, *leaves: torch.Tensor) -> list[torch.Tensor]:
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    return [torch.zeros_like(leaf) if grad is None else grad for leaf, grad in zip(leaves, grads)]


def _fast_and_masked(name: str, scale: float = 3.0, requires_grad_teacher: bool = True):
    generator = torch.Generator().manual_seed(5)
    student = (scale * torch.randn(4, 11, generator=generator)).requires_grad_()
    teacher = (scale * torch.randn(4, 11, generator=generator)).requires_grad_(requires_grad_teacher)
    results = []
    for finite in (True, False):
        value = FAST_PATH_KERNELS[name](N.log_softmax(teacher), N.log_softmax(student), finite)
        leaves = [student, teacher] if requires_grad_teacher else [student]
        results.append((value.detach(), _grads_or_zeros((value * torch.arange(1.0, 5.0)).sum(), *leaves)))
    return results


@pytest.mark.parametrize("name", sorted(FAST_PATH_KERNELS))
def test_fast_path_matches_masked_path(name):
    (fast, fast_grads), (masked, masked_grads) = _fast_and_masked(name)
    torch.testing.assert_close(fast, masked, rtol=1e-6, atol=1e-6)
    for fast_grad, masked_grad in zip(fast_grads, masked_grads):
        torch.testing.assert_close(fast_grad, masked_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(FAST_PATH_KERNELS))
def test_fast_path_without_teacher_gradient(name):
    (fast, fast_grads), (masked, masked_grads) = _fast_and_masked(name, requires_grad_teacher=False)
    torch.testing.assert_close(fast, masked, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast_grads[0], masked_grads[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["kl_forward", "kl_reverse", "cross_entropy", "entropy", "mixture_of_two"])
def test_fast_path_double_backward(name):
    # A Hessian-vector product through the fast path equals the one through the masked path.
    generator = torch.Generator().manual_seed(9)
    student = torch.randn(3, 6, generator=generator, requires_grad=True)
    teacher = torch.randn(3, 6, generator=generator, requires_grad=True)
    direction = torch.randn(3, 6, generator=generator)
    products = []
    for finite in (True, False):
        value = FAST_PATH_KERNELS[name](N.log_softmax(teacher), N.log_softmax(student), finite).sum()
        grads = torch.autograd.grad(value, (student, teacher), create_graph=True, allow_unused=True)
        product = sum((g * direction).sum() for g in grads if g is not None)
        products.append(_grads_or_zeros(product, student, teacher))
    for fast, masked in zip(*products):
        torch.testing.assert_close(fast, masked, rtol=1e-5, atol=1e-6)


def test_all_finite_detects_each_kind():
    finite = torch.tensor([[0.0, -1e30, 5.0]])
    assert N.all_finite(finite, finite)
    for bad in (NEG_INF, math.inf, math.nan):
        tensor = finite.clone()
        tensor[0, 1] = bad
        assert not N.all_finite(finite, tensor), bad


def test_all_finite_is_false_where_sum_overflows():
    # The check is conservative: finite entries whose sum overflows send the caller to the masked path.
    assert not N.all_finite(torch.tensor([3e38, 3e38]))


def test_kernels_choose_masked_path_for_neginf():
    # The plain formula gives 0·(-inf) = NaN at the teacher's -inf entry; the default check avoids it.
    student = torch.tensor([[0.0, 1.0, 2.0, NEG_INF]], requires_grad=True)
    teacher = torch.tensor([[0.5, NEG_INF, 0.0, NEG_INF]])
    value = N.kl(N.log_softmax(teacher), N.log_softmax(student))
    (grad,) = _grad(value, student)
    _close(value, ref.kl(ref.log_softmax(teacher), ref.log_softmax(student.detach())))
    assert torch.isfinite(grad).all()


def test_fast_mixture_recomputes_underflowing_entries():
    # Log-probabilities near -100 and -200 underflow float32 probabilities; the mixture stays exact there.
    a = torch.tensor([[-100.0, -200.0, -0.5, -1000.0]], dtype=torch.float32, requires_grad=True)
    b = torch.tensor([[-101.0, -150.0, -1.0, -1000.5]], dtype=torch.float32, requires_grad=True)
    mix = N.log_mixture([a, b], [0.25, 0.75], finite=True)
    expected = np.logaddexp(np.log(0.25) + a.detach().double().numpy(), np.log(0.75) + b.detach().double().numpy())
    _close(mix, expected, rtol=1e-6, atol=1e-5)
    grad_a, grad_b = _grad(mix, a, b)
    expected_grad_a = 0.25 * np.exp(a.detach().double().numpy() - expected)
    # The gradient is exp(l - m) with m rounded to float32, whose spacing near -1000 is 6e-5.
    _close(grad_a, expected_grad_a, rtol=1e-4, atol=1e-6)
    _close(grad_a + grad_b, np.ones((1, 4)), rtol=1e-4, atol=1e-6)


def test_js_fast_path_matches_reference_at_extreme_logits():
    student, teacher = _extreme_logits(2)
    s, t = N.log_softmax(student), N.log_softmax(teacher)
    assert N.all_finite(s, t)  # ±1e4 logits give finite log-probabilities, so the fast path runs
    ls, lt = ref.log_softmax(student), ref.log_softmax(teacher)
    _close(N.js(t, s, 0.1), ref.js(lt, ls, 0.1))
    _close(N.skew_reverse_kl(t, s, 0.1), ref.skew_reverse_kl(lt, ls, 0.1))


# --- Input errors ------------------------------------------------------------------------


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 5\) but logp_b has shape \(2, 6\)"):
        N.kl(torch.zeros(2, 5), torch.zeros(2, 6))


def test_token_nll_rejects_label_outside_vocabulary():
    with pytest.raises(ValueError, match="label 7 is outside the vocabulary"):
        N.token_nll(torch.zeros(1, 2, 5), torch.tensor([[1, 7]]))


def test_token_nll_rejects_misaligned_labels():
    with pytest.raises(ValueError, match="labels must be aligned"):
        N.token_nll(torch.zeros(1, 3, 5), torch.tensor([[1, 2]]))


def test_js_rejects_beta_outside_unit_interval():
    a = torch.zeros(1, 3)
    with pytest.raises(ValueError, match=r"beta must lie in \[0, 1\], got 1.5"):
        N.js(a, a, 1.5)
