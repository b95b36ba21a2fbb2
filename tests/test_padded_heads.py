"""Padded output heads of one tokenizer in the compiled loss: 151936 student rows against 152064 teacher rows."""

from __future__ import annotations

import pytest
import torch

import kdsl
from kdsl import numerics
from kdsl.errors import KdslError
from kdsl.ir import build
from kdsl.lower import lower
from kdsl.projection import align_heads

TOKENS, SHORT_ROWS, LONG_ROWS, HIDDEN = 151936, 151936, 152064, 4


def hidden_inputs(student_rows: int, teacher_rows: int):
    generator = torch.Generator().manual_seed(0)
    student_hidden = torch.randn(1, 3, HIDDEN, generator=generator, requires_grad=True)
    student_head = torch.randn(student_rows, HIDDEN, generator=generator).requires_grad_(True)
    teacher_hidden = torch.randn(1, 3, HIDDEN, generator=generator)
    teacher_head = torch.randn(teacher_rows, HIDDEN, generator=generator)
    teacher_head[TOKENS:] = 50.0  # padded rows that would take all probability if they were scored
    labels = torch.tensor([[-100, 7, TOKENS - 1]])
    return student_hidden, student_head, teacher_hidden, teacher_head, labels


def reference(student_hidden, student_head, teacher_hidden, teacher_head, labels):
    student, teacher = align_heads(student_hidden @ student_head.T, teacher_hidden @ teacher_head.T, TOKENS)
    per_position = numerics.kl(numerics.log_softmax(teacher), numerics.log_softmax(student))
    return per_position[labels != -100].mean()


@pytest.mark.parametrize("student_rows, teacher_rows", [(SHORT_ROWS, LONG_ROWS), (LONG_ROWS, SHORT_ROWS)])
def test_padded_heads_match_align_heads(student_rows, teacher_rows):
    student_hidden, student_head, teacher_hidden, teacher_head, labels = hidden_inputs(student_rows, teacher_rows)
    objective = kdsl.load("objective = KL(o ‖ q)")
    compiled = lower(build(objective), objective, vocab_size=TOKENS)
    result = compiled(student_hidden=student_hidden, student_head=student_head, teacher_hidden=teacher_hidden,
                      teacher_head=teacher_head, labels=labels)
    expected = reference(student_hidden, student_head, teacher_hidden, teacher_head, labels)
    torch.testing.assert_close(result.loss, expected, rtol=1e-5, atol=1e-6)

    result.loss.backward()
    assert torch.isfinite(student_head.grad).all()
    assert not student_head.grad[TOKENS:].any()
    assert student_head.grad[:TOKENS].abs().sum() > 0


def test_padded_heads_error_policy_names_sizes():
    student_hidden, student_head, teacher_hidden, teacher_head, labels = hidden_inputs(SHORT_ROWS, LONG_ROWS)
    compiled = kdsl.compile('head.policy = "error"\nobjective = KL(o ‖ q)')
    with pytest.raises(KdslError) as caught:
        compiled(student_hidden=student_hidden, student_head=student_head, teacher_hidden=teacher_hidden,
                 teacher_head=teacher_head, labels=labels)
    message = str(caught.value)
    assert "151936" in message
    assert "152064" in message
    assert 'head.policy = "truncate"' in message
