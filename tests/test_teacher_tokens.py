"""Student batches re-encoded with a different teacher tokenizer: the builtin Unigram student and BPE teacher."""

from __future__ import annotations

import pytest
import torch

from kdsl import models
from kdsl.errors import ConfigError
from kdsl.samplers import PairEncoder, collate
from kdsl.teacher_tokens import teacher_batch

PAIRS = [("First Citizen:", " Before we proceed any further, hear me speak."),
         ("ROMEO:", " But soft, what light through yonder window breaks?")]


@pytest.fixture(scope="module")
def tokenizers():
    return models.load_tokenizer("builtin:tiny-student-unigram"), models.load_tokenizer("builtin:tiny-teacher")


def student_batch(student_tokenizer):
    encoder = PairEncoder(student_tokenizer, 32, 32)
    examples = [encoder.encode(prompt, response) for prompt, response in PAIRS]
    return collate(examples, student_tokenizer.pad_token_id if student_tokenizer.pad_token_id is not None
                   else student_tokenizer.eos_token_id)


def test_teacher_batch_text_matches(tokenizers):
    student_tokenizer, teacher_tokenizer = tokenizers
    batch = student_batch(student_tokenizer)
    teacher = teacher_batch(batch.input_ids, batch.attention_mask, batch.labels, student_tokenizer, teacher_tokenizer)
    for row in range(len(PAIRS)):
        student_response = batch.input_ids[row][batch.labels[row] != -100].tolist()
        teacher_response = teacher.labels[row][teacher.labels[row] != -100].tolist()
        assert teacher_tokenizer.decode(teacher_response, skip_special_tokens=True) == \
            student_tokenizer.decode(student_response, skip_special_tokens=True)
        assert teacher_response[-1] == teacher_tokenizer.eos_token_id
        attended = teacher.input_ids[row][teacher.attention_mask[row].bool()].tolist()
        assert teacher_tokenizer.decode(attended, skip_special_tokens=True).startswith(PAIRS[row][0])


def test_teacher_batch_layout(tokenizers):
    student_tokenizer, teacher_tokenizer = tokenizers
    batch = student_batch(student_tokenizer)
    teacher = teacher_batch(batch.input_ids, batch.attention_mask, batch.labels, student_tokenizer, teacher_tokenizer)
    assert teacher.input_ids.shape == teacher.labels.shape == teacher.attention_mask.shape
    scored = teacher.labels != -100
    assert torch.equal(teacher.labels[scored], teacher.input_ids[scored])
    assert bool((teacher.attention_mask[scored] == 1).all())
    assert int(teacher.input_ids.max()) < len(teacher_tokenizer)
    assert student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab()
    assert teacher.input_ids.shape[1] != batch.input_ids.shape[1] or not torch.equal(teacher.input_ids, batch.input_ids)


def test_teacher_batch_shape_mismatch(tokenizers):
    student_tokenizer, teacher_tokenizer = tokenizers
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ConfigError, match="one shape"):
        teacher_batch(ids, torch.ones(1, 3, dtype=torch.long), ids, student_tokenizer, teacher_tokenizer)


def test_teacher_batch_cuts_to_max_length(tokenizers):
    student_tokenizer, teacher_tokenizer = tokenizers
    batch = student_batch(student_tokenizer)
    full = teacher_batch(batch.input_ids, batch.attention_mask, batch.labels, student_tokenizer, teacher_tokenizer)
    lengths = full.attention_mask.sum(dim=1).tolist()
    limit = min(lengths) - 2
    cut = teacher_batch(batch.input_ids, batch.attention_mask, batch.labels, student_tokenizer, teacher_tokenizer,
                        max_length=limit)
    assert cut.input_ids.shape[1] == limit
    for row in range(len(PAIRS)):
        full_response = full.labels[row][full.labels[row] != -100].tolist()
        cut_response = cut.labels[row][cut.labels[row] != -100].tolist()
        if len(full_response) <= limit:
            # The prompt loses its first tokens; the response is kept whole.
            assert cut_response == full_response
            cut_row = cut.input_ids[row][cut.attention_mask[row].bool()].tolist()
            full_row = full.input_ids[row][full.attention_mask[row].bool()].tolist()
            assert cut_row == full_row[-limit:]
        else:
            assert cut_response == full_response[:limit]


def test_teacher_batch_rejects_zero_max_length(tokenizers):
    student_tokenizer, teacher_tokenizer = tokenizers
    batch = student_batch(student_tokenizer)
    with pytest.raises(ConfigError, match="max_length = 0"):
        teacher_batch(batch.input_ids, batch.attention_mask, batch.labels, student_tokenizer, teacher_tokenizer,
                      max_length=0)


def test_teacher_batch_ends_spell_the_same_text(tokenizers):
    student_tokenizer, teacher_tokenizer = tokenizers
    batch = student_batch(student_tokenizer)
    teacher = teacher_batch(batch.input_ids, batch.attention_mask, batch.labels, student_tokenizer, teacher_tokenizer)
    for row in range(len(PAIRS)):
        response_text = student_tokenizer.decode(batch.input_ids[row][batch.labels[row] != -100].tolist(),
                                                 skip_special_tokens=True)
        for ids, labels, mask, ends, tokenizer in (
            (batch.input_ids, batch.labels, batch.attention_mask, teacher.student_ends, student_tokenizer),
            (teacher.input_ids, teacher.labels, teacher.attention_mask, teacher.teacher_ends, teacher_tokenizer),
        ):
            scored = labels[row] != -100
            attended = mask[row].bool()
            assert bool((ends[row][attended & ~scored] == 0).all())
            assert bool((ends[row][~attended] == -1).all())
            response_ends = ends[row][scored].tolist()
            assert response_ends == sorted(response_ends)
            assert response_ends[-1] == len(response_text)
            # The text read through each response token is the decoded response up to it.
            response_ids = ids[row][scored].tolist()
            for count in (1, len(response_ids) // 2, len(response_ids)):
                decoded = tokenizer.decode(response_ids[:count], skip_special_tokens=True)
                assert response_text[: response_ends[count - 1]].strip() == decoded.strip()
    # The two tokenizers agree on most boundaries, so most student ends are teacher ends too.
    shared = [end in set(teacher.teacher_ends[row].tolist())
              for row in range(len(PAIRS)) for end in teacher.student_ends[row][batch.labels[row] != -100].tolist()]
    assert sum(shared) / len(shared) > 0.5


def test_teacher_batch_ends_follow_a_cut(tokenizers):
    student_tokenizer, teacher_tokenizer = tokenizers
    batch = student_batch(student_tokenizer)
    full = teacher_batch(batch.input_ids, batch.attention_mask, batch.labels, student_tokenizer, teacher_tokenizer)
    limit = min(full.attention_mask.sum(dim=1).tolist()) - 2
    cut = teacher_batch(batch.input_ids, batch.attention_mask, batch.labels, student_tokenizer, teacher_tokenizer,
                        max_length=limit)
    for row in range(len(PAIRS)):
        full_ends = full.teacher_ends[row][full.labels[row] != -100].tolist()
        cut_ends = cut.teacher_ends[row][cut.labels[row] != -100].tolist()
        assert cut_ends == full_ends[: len(cut_ends)]
    assert torch.equal(cut.student_ends, full.student_ends)


def test_token_bridge_round_trip(tokenizers):
    """d_o across tokenizers: the teacher reads the prompt in its tokens, and its completion returns in the student's."""
    from kdsl.samplers import TokenBridge

    student_tokenizer, teacher_tokenizer = tokenizers
    bridge = TokenBridge(student_tokenizer, teacher_tokenizer)
    prompt, response = PAIRS[1]
    student_prompt = student_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    teacher_prompt = bridge.prompt(student_prompt)
    assert teacher_tokenizer.decode(teacher_prompt) == student_tokenizer.decode(student_prompt)
    assert teacher_prompt != student_prompt
    completion = teacher_tokenizer(prompt + response, add_special_tokens=False)["input_ids"][len(teacher_prompt):]
    completion = completion + [teacher_tokenizer.eos_token_id, teacher_tokenizer.eos_token_id]  # padding after EOS
    student_response = bridge.response(teacher_prompt, completion[: completion.index(teacher_tokenizer.eos_token_id) + 1])
    assert student_response[-1] == student_tokenizer.eos_token_id
    assert max(student_response) < len(student_tokenizer)
    together = student_tokenizer.decode(list(student_prompt) + list(student_response), skip_special_tokens=True)
    assert together == prompt + response
    assert bridge.response(teacher_prompt, []) == ()
    # An empty prompt becomes one token the first response token can follow.
    assert bridge.prompt([]) in ([teacher_tokenizer.bos_token_id], [teacher_tokenizer.eos_token_id])
