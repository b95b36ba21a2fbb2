"""DIMP sequence weights ρ(w) = ref(w)/q(w): log space, clipping, no gradient, trainer and builtin reference.

The weights are checked against float64 references computed from
log-probabilities. Sequences of 100 tokens at probability 1e-3 each have
probability 1e-300, far below float32's range, so a weight formed as a
quotient of probabilities would be 0/0.
"""

from __future__ import annotations

import difflib
import math
import os
from pathlib import Path

import pytest
import torch

import kdsl
from kdsl import ir
from kdsl.errors import ConfigError
from kdsl.train import TrainConfig, Trainer, compile_objective, train
from tests.test_samplers import make_model, make_pairs, make_tokenizer

ROOT = Path(__file__).resolve().parents[1]
GOLDEN_GRAPH = ROOT / "tests" / "golden" / "graphs" / "dimp.graph"
UPDATE = os.environ.get("KDSL_UPDATE_GOLDEN") == "1"

RAW_RATIO = 'ref = "builtin:tiny-ref"\nρ(w) = ref(w) / q(w)\nobjective = ρ(w) · CE\n'
PER_TOKEN_RATIO = 'ref = "builtin:tiny-ref"\nρ(T, w) = (ref(w) / q(w))^(1/T)\nobjective = ρ(T, w) · CE\n'

VOCAB = 1000  # uniform logits give every token probability 1e-3
LENGTH = 100  # so a whole response has probability 1e-300


pytestmark = pytest.mark.usefixtures("one_thread")


def long_batch(boosts: list[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student logits (uniform), reference logits and labels; row b's reference raises each label's logit by boosts[b]."""
    generator = torch.Generator().manual_seed(0)
    batch = len(boosts)
    labels = torch.randint(0, VOCAB, (batch, LENGTH), generator=generator)
    labels[1:, :3] = -100  # a prompt: the other rows are 3 tokens shorter
    student = torch.zeros(batch, LENGTH, VOCAB, requires_grad=True)
    ref = torch.zeros(batch, LENGTH, VOCAB)
    rows = torch.arange(batch).unsqueeze(1).expand(batch, LENGTH)
    columns = torch.arange(LENGTH).expand(batch, LENGTH)
    valid = labels != -100
    boost = torch.tensor(boosts).unsqueeze(1).expand(batch, LENGTH)
    ref[rows[valid], columns[valid], labels[valid]] = boost[valid]
    return student, ref, labels


def log_sequence_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(w) per row in float64: the sum of the label log-probabilities over valid positions."""
    logp = torch.log_softmax(logits.detach().double(), dim=-1)
    valid = labels != -100
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, 0.0).sum(dim=1)


def weighted_ce(student: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_b weights[b] · Σ_t CE[b, t] / (valid tokens), in float64, with a gradient path to `student`."""
    logp = torch.log_softmax(student.double(), dim=-1)
    valid = labels != -100
    nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    per_row = torch.where(valid, nll, 0.0).sum(dim=1)
    return (weights * per_row).sum() / valid.sum()


# --- Log space ------------------------------------------------------------------------------


def test_sequence_probabilities_underflow_float32():
    student, ref, labels = long_batch([0.0, 0.2])
    log_q = log_sequence_probs(student, labels)
    assert math.isclose(float(log_q[0]), LENGTH * math.log(1e-3), rel_tol=1e-9)  # q(w) = 1e-300
    assert torch.exp(log_q.float()).eq(0).all()  # the quotient of probabilities would be 0/0 in float32


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "dense"])
def test_raw_ratio_is_finite_for_1e300_probabilities(fused):
    student, ref, labels = long_batch([0.0, 0.2, -0.1])
    compiled = kdsl.compile(RAW_RATIO, fused=fused, settings={"train.chunk_size": 64})
    result = compiled(student_logits=student, labels=labels, ref_logits=ref)
    weights = torch.exp(log_sequence_probs(ref, labels) - log_sequence_probs(student, labels))
    assert math.isclose(float(weights[0]), 1.0, rel_tol=1e-12)  # ref(w) = q(w) = 1e-300
    assert float(weights[1]) > 1e6
    expected = weighted_ce(student, labels, weights)
    assert torch.isfinite(result.loss)
    # The per-token log-probabilities are float32 (about 4e-7 nats off each), so log p(w) over 100 tokens is
    # about 4e-5 nats off, and so is the log of the weight. Summed in float32 instead, it would be 5e-4.
    torch.testing.assert_close(result.loss.double(), expected.detach(), rtol=1.5e-4, atol=0.0)


def test_per_token_ratio_is_a_clipped_sequence_weight():
    objective = kdsl.load(PER_TOKEN_RATIO, {"rho.clip": 1.1})
    (term,) = objective.terms
    assert term.token_weight is None
    assert term.sequence_weight is not None
    assert "sequence_weight(T=%T_w" in ir.build(objective).format()
    assert "clip=1.1" in ir.build(objective).format()

    student, ref, labels = long_batch([0.0, 0.05, 0.5])
    compiled = kdsl.compile(PER_TOKEN_RATIO, settings={"rho.clip": 1.1, "train.chunk_size": 64})
    result = compiled(student_logits=student, labels=labels, ref_logits=ref)
    lengths = (labels != -100).sum(dim=1).double()
    geometric = torch.exp((log_sequence_probs(ref, labels) - log_sequence_probs(student, labels)) / lengths)
    assert float(geometric[1]) < 1.1 < float(geometric[2])  # one row below the clip, one above
    expected = weighted_ce(student, labels, geometric.clamp(max=1.1))
    torch.testing.assert_close(result.loss.double(), expected.detach(), rtol=2e-5, atol=0.0)


def test_per_token_ratio_is_built_in_log_space():
    import sympy

    from kdsl.objective import LENGTH, LOG_Q_SEQ, LOG_REF_SEQ

    expr = kdsl.load(PER_TOKEN_RATIO).terms[0].sequence_weight.expr
    # One exponential of a difference of logs, with no exp(-log q(w)) that overflows on its own.
    assert expr == sympy.exp((LOG_REF_SEQ - LOG_Q_SEQ) / LENGTH)


# --- Clipping ---------------------------------------------------------------------------------


def test_clip_caps_the_weight():
    student, ref, labels = long_batch([0.0, 0.2])
    compiled = kdsl.compile(RAW_RATIO, settings={"rho.clip": 5.0})
    result = compiled(student_logits=student, labels=labels, ref_logits=ref)
    expected = weighted_ce(student, labels, torch.tensor([1.0, 5.0], dtype=torch.float64))
    torch.testing.assert_close(result.loss.double(), expected.detach(), rtol=2e-5, atol=0.0)


def test_clip_caps_a_ratio_beyond_float32():
    # A log ratio of about 2 per token sums to about 200 nats: exp(200) is inf in float32, and the clip makes it 5.
    student, ref, labels = long_batch([0.0, 9.0])
    log_ratio = log_sequence_probs(ref, labels) - log_sequence_probs(student, labels)
    assert float(log_ratio[1]) > 89.0  # beyond float32's largest exponent
    compiled = kdsl.compile(RAW_RATIO, settings={"rho.clip": 5.0})
    result = compiled(student_logits=student, labels=labels, ref_logits=ref)
    expected = weighted_ce(student, labels, torch.tensor([1.0, 5.0], dtype=torch.float64))
    assert torch.isfinite(result.loss)
    torch.testing.assert_close(result.loss.double(), expected.detach(), rtol=2e-5, atol=0.0)


# --- No gradient through ρ ----------------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "dense"])
def test_weight_is_detached(fused):
    generator = torch.Generator().manual_seed(3)
    student = torch.randn(2, 5, 11, generator=generator).requires_grad_()
    ref = torch.randn(2, 5, 11, generator=generator).requires_grad_()
    labels = torch.randint(0, 11, (2, 5), generator=generator)
    labels[0, :2] = -100

    compiled = kdsl.compile(RAW_RATIO, fused=fused)
    result = compiled(student_logits=student, labels=labels, ref_logits=ref)
    (grad,) = torch.autograd.grad(result.loss, student)

    leaf = student.detach().double().requires_grad_()
    log_ratio = log_sequence_probs(ref, labels) - log_sequence_probs(leaf, labels)
    detached = weighted_ce(leaf, labels, torch.exp(log_ratio).detach())
    (expected,) = torch.autograd.grad(detached, leaf)
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-7)

    # The same loss with the gradient flowing through ρ differs, so the comparison above can fail.
    leaf = student.detach().double().requires_grad_()
    logp = torch.log_softmax(leaf, dim=-1)
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    log_q = torch.where(labels != -100, picked, 0.0).sum(dim=1)
    through = weighted_ce(leaf, labels, torch.exp(log_sequence_probs(ref, labels) - log_q))
    (undetached,) = torch.autograd.grad(through, leaf)
    assert not torch.allclose(undetached, expected, rtol=1e-3, atol=1e-5)

    assert ref.grad is None  # nothing reaches the reference logits


# --- Spec, golden graph, trainer and builtin --------------------------------------------------------


def test_dimp_spec_golden_graph():
    objective = kdsl.load(ROOT / "specs" / "dimp.kd")
    (term,) = objective.terms
    assert term.sequence_weight is not None
    assert objective.settings["rho.clip"] == 5.0
    text = ir.build(objective).format()
    if UPDATE:
        GOLDEN_GRAPH.write_text(text, encoding="utf-8")
    assert GOLDEN_GRAPH.exists(), f"{GOLDEN_GRAPH} is missing; run with KDSL_UPDATE_GOLDEN=1 to write it"
    expected = GOLDEN_GRAPH.read_text(encoding="utf-8")
    diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True), "golden", "built"))
    assert text == expected, f"graph of specs/dimp.kd differs from {GOLDEN_GRAPH.name}:\n{diff}"


TRAIN_SETTINGS = {
    "train.batch_size": 4,
    "train.max_steps": 2,
    "train.baseline": False,
    "data.max_prompt_tokens": 12,
    "data.max_response_tokens": 12,
    "sgo.max_new_tokens": 8,
    "eval.max_pairs": 4,
    "eval.max_new_tokens": 4,
    "eval.bootstrap": 0,
}


def test_trainer_runs_reference_model(tmp_path):
    tokenizer = make_tokenizer()
    ref = make_model(len(tokenizer), seed=4)
    calls = []
    ref.register_forward_hook(lambda module, args, output: calls.append(output.logits.shape))
    objective = kdsl.load(ROOT / "specs" / "dimp.kd", TRAIN_SETTINGS)
    result = train(
        objective, compile_objective(objective), out_dir=tmp_path / "run", student=make_model(len(tokenizer), seed=1),
        teacher=make_model(len(tokenizer), seed=3), tokenizer=tokenizer, pairs=make_pairs(16),
        heldout=make_pairs(4), ref=ref, progress_bar=False,
    )
    steps = [r for r in result.metrics if "loss/total" in r]
    assert len(steps) == 2
    assert all(math.isfinite(r["loss/total"]) for r in steps)
    assert all(r["source/0"] == "d_o" for r in steps)
    assert len(calls) == 2  # one reference forward per step, on the teacher's samples


def test_trainer_without_reference_is_rejected(tmp_path):
    from accelerate import Accelerator

    tokenizer = make_tokenizer()
    objective = kdsl.load(ROOT / "specs" / "dimp.kd", TRAIN_SETTINGS)
    with pytest.raises(ConfigError, match="reads the ref model"):
        Trainer(
            name="dimp", objective=objective, compiled=compile_objective(objective),
            student=make_model(len(tokenizer)), teacher=make_model(len(tokenizer), seed=3), tokenizer=tokenizer,
            pairs=make_pairs(8), heldout=None, config=TrainConfig.from_settings(objective.settings),
            accelerator=Accelerator(cpu=True), run_dir=tmp_path, ref=None, progress_bar=False,
        )


def test_builtin_reference_matches_student_shape():
    from kdsl import models

    assert "builtin:tiny-ref" in models.builtin_names()
    ref = models.load_model("builtin:tiny-ref")
    student = models.load_model("builtin:tiny-student")
    for key in ("n_layer", "n_embd", "n_head", "vocab_size", "n_positions"):
        assert getattr(ref.config, key) == getattr(student.config, key), key
    assert models.load_tokenizer("builtin:tiny-ref").get_vocab() == models.load_tokenizer("builtin:tiny-student").get_vocab()
    # Trained, not initial: the weights differ from the student's.
    assert not torch.equal(ref.transformer.wte.weight, student.transformer.wte.weight)
