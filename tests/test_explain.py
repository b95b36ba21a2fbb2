"""`kdsl explain`: a dry run that needs no models."""

from __future__ import annotations

from pathlib import Path

import kdsl
from kdsl.explain import explain, group_cost

ROOT = Path(__file__).resolve().parents[1]


def test_wsgo_lists_both_groups():
    text = explain(kdsl.load(ROOT / "specs" / "wsgo.kd"), batch=4, length=128, student_vocab=4096)
    assert "group 0: E[w ~ 1/2·d_q + 1/2·d_data]" in text
    assert "group 1: E[w ~ d_data]  terms: CE" in text
    assert "student generation: 0.5 of the batch" in text
    assert "teacher forward" in text


def test_fused_estimate_below_dense_for_large_vocab():
    objective = kdsl.load("objective = JS[0.5](o ‖ q)")
    cost = group_cost(objective, 0, batch=8, length=512, student_vocab=50257, teacher_vocab=50257, hidden=1024, chunk=256)
    assert cost.fused_bytes < 0.2 * cost.dense_bytes
    assert cost.distributions == ["o", "1/2·o + 1/2·q", "q"]


def test_ce_only_needs_no_teacher():
    objective = kdsl.load("objective = CE")
    cost = group_cost(objective, 0, batch=2, length=8, student_vocab=100, teacher_vocab=100, hidden=None, chunk=4)
    assert not cost.teacher_forward
    assert cost.student_generations == 0


def test_projection_cost_is_shown_and_not_chunked():
    objective = kdsl.load(ROOT / "specs" / "dskd.kd", same_vocab=False)
    cost = group_cost(objective, 0, batch=2, length=64, student_vocab=3000, teacher_vocab=4096, hidden=None, chunk=16)
    # 4 attention matrices of 2×64×64 and the two projected logit tensors with their gradients, in float32.
    assert cost.projection_bytes == 4 * (4 * 2 * 64 * 64 + 2 * 2 * 64 * (3000 + 4096))
    assert cost.fused_bytes == cost.dense_bytes  # the projected path evaluates whole tensors
    text = explain(objective, batch=2, length=64, student_vocab=3000, teacher_vocab=4096)
    assert "projection (cross-model attention, computed once and shared)" in text
    assert "projection memory (estimate): 7.1 MiB" in text
