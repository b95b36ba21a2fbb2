"""Per-step statistics of sequence weights ρ(w): hand-computed cases and the values the trainer logs."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

import kdsl
from kdsl.train import TrainConfig, Trainer, compile_objective
from kdsl.weight_stats import SequenceWeightStats
from tests.test_samplers import make_model, make_pairs, make_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DIMP = 'ref = "builtin:tiny-ref"\nρ(T, w) = (ref(w) / q(w))^(1/T)\nobjective = ρ(T, w) · CE\n'
VOCAB = 4  # uniform student logits give every token q = 1/4


pytestmark = pytest.mark.usefixtures("one_thread")


def hand_batch(label_probs: list[list[float]], width: int = 3):
    """Labels, uniform student logits and reference logits that give each label the listed probability.

    Row b scores len(label_probs[b]) tokens at its end (the columns before are a prompt, -100).
    Under the reference, the label of a scored position has the listed probability and the
    other tokens share the rest equally. Token ids cycle through 0..3.
    """
    batch = len(label_probs)
    labels = torch.full((batch, width), -100)
    ref = torch.full((batch, width, VOCAB), math.log(1.0 / VOCAB))
    for row, probs in enumerate(label_probs):
        for offset, prob in enumerate(probs):
            column = width - len(probs) + offset
            token = (row + column) % VOCAB
            labels[row, column] = token
            ref[row, column] = math.log((1.0 - prob) / (VOCAB - 1))
            ref[row, column, token] = math.log(prob)
    student = torch.zeros(batch, width, VOCAB)
    return labels, student, ref


def observe(module, stats: SequenceWeightStats, label_probs: list[list[float]]) -> None:
    labels, student, ref = hand_batch(label_probs)
    stats.observe(module(student_logits=student, labels=labels, ref_logits=ref))


def test_mean_and_clipped_share_hand_computed():
    module = kdsl.compile(DIMP, settings={"rho.clip": 3.0})
    stats = SequenceWeightStats.for_module(module)
    # Per token ρ is ref/q = 4·p, and over a response the geometric mean of those ratios:
    # [0.5, 0.5] → 2, [0.5, 0.125] → sqrt(2 · 0.5) = 1, [0.9] → 3.6 (clipped to 3), [] → not counted.
    observe(module, stats, [[0.5, 0.5], [0.5, 0.125], [0.9], []])
    metrics = stats.collect()
    assert set(metrics) == {"rho/mean", "rho/clipped"}
    assert metrics["rho/mean"] == pytest.approx((2.0 + 1.0 + 3.0) / 3, rel=1e-6)
    assert metrics["rho/clipped"] == pytest.approx(1 / 3)


def test_batches_accumulate_until_collect():
    module = kdsl.compile(DIMP, settings={"rho.clip": 3.0})
    stats = SequenceWeightStats.for_module(module)
    observe(module, stats, [[0.5, 0.5], [0.9]])  # 2 and 3.6 → 3 (clipped)
    observe(module, stats, [[0.125, 0.125, 0.125]])  # 0.5
    metrics = stats.collect()
    assert metrics["rho/mean"] == pytest.approx((2.0 + 3.0 + 0.5) / 3, rel=1e-6)
    assert metrics["rho/clipped"] == pytest.approx(1 / 3)
    assert stats.collect() == {}  # the sums start again after each step


def test_without_clip_logs_mean_only():
    module = kdsl.compile(DIMP)
    stats = SequenceWeightStats.for_module(module)
    observe(module, stats, [[0.9], [0.5, 0.5]])
    assert stats.collect() == {"rho/mean": pytest.approx((3.6 + 2.0) / 2, rel=1e-6)}


def test_two_weighted_terms_keyed_by_term():
    text = ('ref = "builtin:tiny-ref"\nρ(T, w) = (ref(w) / q(w))^(1/T)\n'
            "objective = ρ(T, w) · CE + E[w ~ d_data] ρ(T, w)^2 · KL(o ‖ q)\n")
    module = kdsl.compile(text, settings={"rho.clip": 3.0})
    stats = SequenceWeightStats.for_module(module)
    labels, student, ref = hand_batch([[0.5, 0.5], [0.25]])  # ρ = 2 and 1, so ρ² = 4 (clipped to 3) and 1
    stats.observe(module(student_logits=student, labels=labels, ref_logits=ref, teacher_logits=torch.zeros_like(student)))
    metrics = stats.collect()
    keys = list(module.term_keys.values())
    assert len(keys) == 2
    assert metrics[f"rho/mean/{keys[0]}"] == pytest.approx(1.5, rel=1e-6)
    assert metrics[f"rho/mean/{keys[1]}"] == pytest.approx(2.0, rel=1e-6)
    assert metrics[f"rho/clipped/{keys[0]}"] == 0.0
    assert metrics[f"rho/clipped/{keys[1]}"] == 0.5


def test_objective_without_sequence_weight_has_no_stats():
    assert SequenceWeightStats.for_module(kdsl.compile("objective = KL(o ‖ q) + CE")) is None


# --- The trainer -----------------------------------------------------------------------------------


class RecordingTrainer(Trainer):
    """The training loop, keeping every batch it draws."""

    def draw(self, point):
        batches = super().draw(point)
        self.drawn.append(batches)
        return batches


def sequence_log_probs(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(w) in float64 and T for each row of a batch, scored as the trainer aligns logits and labels."""
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    labels = batch.labels[:, 1:]
    valid = labels != -100
    logp = torch.log_softmax(logits.double(), dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, logp, 0.0).sum(dim=1), valid.sum(dim=1)


def test_trainer_logs_rho_of_its_batch(tmp_path):
    from accelerate import Accelerator

    tokenizer = make_tokenizer()
    student, ref = make_model(len(tokenizer), seed=1), make_model(len(tokenizer), seed=4)
    initial = copy.deepcopy(student)
    # A clip of 1 sits near the middle of the weights of two untrained models, so some are clipped.
    settings = {"train.batch_size": 6, "train.max_steps": 1, "train.eval_every": 0, "data.max_prompt_tokens": 12,
                "data.max_response_tokens": 12, "sgo.max_new_tokens": 8, "rho.clip": 1.0}
    objective = kdsl.load(ROOT / "specs" / "dimp.kd", settings)
    trainer = RecordingTrainer(
        name="dimp", objective=objective, compiled=compile_objective(objective), student=student,
        teacher=make_model(len(tokenizer), seed=3), tokenizer=tokenizer, pairs=make_pairs(12), heldout=None,
        config=TrainConfig.from_settings(objective.settings), accelerator=Accelerator(cpu=True), run_dir=tmp_path,
        ref=ref, progress_bar=False,
    )
    trainer.drawn = []
    fit = trainer.run()

    (batch,) = trainer.drawn[0][0]  # the step's one micro-batch of its one group (teacher samples)
    log_q, lengths = sequence_log_probs(initial, batch)
    log_ref, _ = sequence_log_probs(ref, batch)
    scored = lengths > 0
    weights = torch.exp((log_ref - log_q)[scored] / lengths[scored])
    expected_mean = float(weights.clamp(max=1.0).mean())
    expected_clipped = float((weights > 1.0).double().mean())
    assert 0.0 < expected_clipped < 1.0

    record = next(r for r in fit.metrics if "loss/total" in r)
    assert record["rho/mean"] == pytest.approx(expected_mean, rel=1e-4)
    assert record["rho/clipped"] == pytest.approx(expected_clipped)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged[0]["rho/mean"] == record["rho/mean"]
    assert logged[0]["rho/clipped"] == record["rho/clipped"]
