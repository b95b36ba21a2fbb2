"""A training batch in the teacher's own tokens, for a teacher and a student with different tokenizers.

The student batch is right-padded, with `labels` equal to `input_ids` on
response tokens and -100 on prompt and padding (the layout of
`kdsl.samplers.Batch`). `teacher_batch` decodes each row's prompt and
response with the student tokenizer and encodes the text with the teacher
tokenizer, so the teacher never reads student ids. The result has the same
layout, and the trainer shifts both batches the same way. It also
gives, for each token of either batch, how far into the response text the
model has read once it has read that token (`student_ends`,
`teacher_ends`), which lets a projection pair positions of the two
streams that have read the same text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdsl.errors import ConfigError
from kdsl.projection import retokenize

__all__ = ["TeacherBatch", "teacher_batch"]

IGNORE_INDEX = -100


@dataclass
class TeacherBatch:
    """The teacher's tokens of a student batch: right-padded ids, attention mask and labels, each [B, L_t].

    `student_ends` [B, L_s] and `teacher_ends` [B, L_t] count the characters
    of the row's response text read through each token: 0 on prompt tokens,
    the end of the token's character span on response tokens, -1 on padding.
    A student position and a teacher position with the same count have read
    the same text.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    student_ends: torch.Tensor | None = None
    teacher_ends: torch.Tensor | None = None


def teacher_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                  student_tokenizer, teacher_tokenizer, *, max_length: int | None = None) -> TeacherBatch:
    """Re-encode each row's prompt and response of a student batch with the teacher tokenizer.

    The prompt is the run of attended tokens before the first label, and the
    response the tokens with labels. A response that ends with the student's
    EOS ends with the teacher's EOS (`kdsl.projection.retokenize`). A row
    longer than `max_length` teacher tokens loses prompt tokens from its start
    first, then response tokens from its end.
    """
    if max_length is not None and max_length < 1:
        raise ConfigError(f"invalid max_length = {max_length}: pass a positive number of teacher tokens, or None")
    if input_ids.shape != labels.shape or input_ids.shape != attention_mask.shape:
        raise ConfigError(f"input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)} and labels "
                          f"{tuple(labels.shape)} must have one shape [batch, length]")
    pad_id = teacher_tokenizer.pad_token_id
    if pad_id is None:
        pad_id = teacher_tokenizer.eos_token_id
    if pad_id is None:
        raise ConfigError("the teacher tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token before training")

    rows = []
    student_ends = torch.full(tuple(input_ids.shape), -1, dtype=torch.long)
    for row in range(input_ids.shape[0]):
        attended = attention_mask[row].bool()
        scored = labels[row].ne(IGNORE_INDEX)
        prompt = input_ids[row][attended & ~scored].tolist()
        response = input_ids[row][scored].tolist()
        prompt_text = student_tokenizer.decode(prompt, skip_special_tokens=True)
        teacher_prompt = list(teacher_tokenizer(prompt_text, add_special_tokens=False, verbose=False)["input_ids"]) if prompt_text else []
        teacher_response, response_ends = [], []
        if response:
            aligned = retokenize(response, student_tokenizer, teacher_tokenizer, context_ids=prompt)
            teacher_response = aligned.teacher_ids
            response_ends = [end for _, end in aligned.teacher_offsets]
            student_ends[row, len(prompt) : len(prompt) + len(response)] = torch.tensor(
                [end for _, end in aligned.student_offsets], dtype=torch.long)
        student_ends[row, : len(prompt)] = 0
        if max_length is not None and len(teacher_prompt) + len(teacher_response) > max_length:
            keep_prompt = max(max_length - len(teacher_response), 0)
            teacher_prompt = teacher_prompt[len(teacher_prompt) - keep_prompt :] if keep_prompt else []
            teacher_response = teacher_response[: max_length - len(teacher_prompt)]
            response_ends = response_ends[: len(teacher_response)]
        rows.append((teacher_prompt, teacher_response, response_ends))

    width = max(max(len(p) + len(r) for p, r, _ in rows), 1)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    teacher_labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    teacher_ends = torch.full((len(rows), width), -1, dtype=torch.long)
    for row, (prompt, response, ends) in enumerate(rows):
        sequence = prompt + response
        ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[row, : len(sequence)] = 1
        teacher_labels[row, len(prompt) : len(sequence)] = torch.tensor(response, dtype=torch.long)
        teacher_ends[row, : len(prompt)] = 0
        teacher_ends[row, len(prompt) : len(sequence)] = torch.tensor(ends, dtype=torch.long)
    device = input_ids.device
    return TeacherBatch(ids.to(device), mask.to(device), teacher_labels.to(device),
                        student_ends.to(device), teacher_ends.to(device))
