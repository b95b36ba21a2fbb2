"""Tests of the cross-vocabulary primitives: the Dual-Space KD projector, padded heads and re-tokenisation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from kdsl import numerics
from kdsl.errors import ConfigError, KdslError
from kdsl.projection import (
    DualSpaceProjector,
    align_heads,
    build_projector,
    projected_accuracy,
    retokenize,
    retokenize_batch,
)

D_S, D_T, V_S, V_T = 8, 12, 11, 13


# --- A small two-tokenizer batch ------------------------------------------------------


def make_batch(seed: int = 0, student_length: int = 7, teacher_length: int = 9):
    """Random hidden states, embeddings and heads with prompt and padding positions masked."""
    g = torch.Generator().manual_seed(seed)
    batch = {
        "student_hidden": torch.randn(2, student_length, D_S, generator=g),
        "teacher_hidden": torch.randn(2, teacher_length, D_T, generator=g),
        "student_input_ids": torch.randint(0, V_S, (2, student_length), generator=g),
        "student_labels": torch.randint(0, V_S, (2, student_length), generator=g),
        "teacher_input_ids": torch.randint(0, V_T, (2, teacher_length), generator=g),
        "teacher_labels": torch.randint(0, V_T, (2, teacher_length), generator=g),
        "student_embedding": torch.randn(V_S, D_S, generator=g),
        "teacher_embedding": torch.randn(V_T, D_T, generator=g),
        "student_head": torch.randn(V_S, D_S, generator=g),
        "teacher_head": torch.randn(V_T, D_T, generator=g),
    }
    batch["student_labels"][0, :2] = -100  # prompt
    batch["student_labels"][1, :3] = -100
    batch["student_labels"][1, -1] = -100  # padding
    batch["teacher_labels"][0, :3] = -100
    batch["teacher_labels"][1, :2] = -100
    batch["teacher_labels"][1, -2:] = -100
    return batch


def pad_right(batch: dict, student_extra: int, teacher_extra: int, seed: int = 1) -> dict:
    """Append masked positions with random content to both sides."""
    g = torch.Generator().manual_seed(seed)
    padded = dict(batch)
    for side, extra, dim, vocab in (("student", student_extra, D_S, V_S), ("teacher", teacher_extra, D_T, V_T)):
        hidden = batch[f"{side}_hidden"]
        padded[f"{side}_hidden"] = torch.cat([hidden, 10 * torch.randn(2, extra, dim, generator=g)], dim=1)
        ids = torch.randint(0, vocab, (2, extra), generator=g)
        padded[f"{side}_input_ids"] = torch.cat([batch[f"{side}_input_ids"], ids], dim=1)
        padded[f"{side}_labels"] = torch.cat([batch[f"{side}_labels"], torch.full((2, extra), -100)], dim=1)
    return padded


def project(projector: DualSpaceProjector, batch: dict):
    arguments = dict(batch)
    return projector(arguments.pop("student_hidden"), arguments.pop("teacher_hidden"), **arguments)


# --- Projector parameters -------------------------------------------------------------


def test_projector_parameter_names_and_shapes():
    projector = DualSpaceProjector(D_S, D_T)
    shapes = {name: tuple(tensor.shape) for name, tensor in projector.state_dict().items()}
    assert shapes == {
        "query.0.weight": (2 * D_T, 2 * D_S),
        "query.0.bias": (2 * D_T,),
        "t2s.0.weight": (D_S, D_T),
        "t2s.0.bias": (D_S,),
        "s2t.0.weight": (D_T, D_S),
        "s2t.0.bias": (D_T,),
    }


def test_projector_without_attention_has_no_query():
    projector = DualSpaceProjector(D_S, D_T, cross_attention=False)
    assert not any(name.startswith("query") for name in projector.state_dict())
    with pytest.raises(ConfigError, match="project_aligned"):
        project(projector, make_batch())


def test_projector_structure_with_hidden_layer():
    layers = build_projector("s-2t-relu-t", D_S, D_T)
    assert [type(layer) for layer in layers] == [nn.Linear, nn.ReLU, nn.Linear]
    assert (layers[0].in_features, layers[0].out_features, layers[2].out_features) == (D_S, 2 * D_T, D_T)
    projector = DualSpaceProjector(D_S, D_T, structures={"s2t": "s-2t-relu-t"})
    result = project(projector, make_batch())
    assert result.q_to_o.shape == (2, 9, V_T)


@pytest.mark.parametrize(
    ("structure", "message"),
    [("t", "at least two sizes"), ("relu-t", "must start with a size"), ("t-x", "unknown part 'x'"), ("t-2.5s", "unknown part")],
)
def test_projector_structure_rejected(structure, message):
    with pytest.raises(ConfigError, match=message):
        build_projector(structure, D_S, D_T)


def test_projector_structure_wrong_sizes():
    with pytest.raises(ConfigError, match="maps 8 → 12 features, expected 12 → 8"):
        DualSpaceProjector(D_S, D_T, structures={"t2s": "s-t"})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"compat": "exact"}, "invalid projection compat mode 'exact'"),
        ({"structures": {"key": "t-t"}}, "unknown projector name"),
        ({"alignment": "offsets"}, "invalid projection alignment 'offsets'"),
    ],
)
def test_projector_options_rejected(options, message):
    with pytest.raises(ConfigError, match=message):
        DualSpaceProjector(D_S, D_T, **options)


def test_projector_hidden_size_rejected():
    with pytest.raises(ConfigError, match="teacher_hidden_size must be a positive integer, got 0"):
        DualSpaceProjector(D_S, 0)


# --- Saving and loading ---------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    source = DualSpaceProjector(D_S, D_T)
    path = tmp_path / "projector.safetensors"
    source.save_pretrained(path)
    target = DualSpaceProjector(D_S, D_T)
    assert target.load_pretrained(path) == []
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor), name
    batch = make_batch()
    torch.testing.assert_close(project(target, batch).o_to_q, project(source, batch).o_to_q, rtol=0, atol=0)


def test_state_dict_round_trip():
    torch.manual_seed(0)
    source = DualSpaceProjector(D_S, D_T, compat="dskd")
    target = DualSpaceProjector(D_S, D_T, compat="dskd")
    target.load_state_dict(source.state_dict())
    batch = make_batch()
    torch.testing.assert_close(project(target, batch).q_to_o, project(source, batch).q_to_o, rtol=0, atol=0)


def test_load_projector_pt_and_flat_names(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = DualSpaceProjector(D_S, D_T)
    torch.save(source.state_dict(), tmp_path / "projector.pt")
    flat = {f"proj_{name.replace('.0.', '_')}": tensor for name, tensor in source.state_dict().items()}
    save_file(flat, tmp_path / "flat.safetensors")
    for path in (tmp_path / "projector.pt", tmp_path / "flat.safetensors"):
        target = DualSpaceProjector(D_S, D_T)
        target.load_pretrained(path)
        for name, tensor in source.state_dict().items():
            assert torch.equal(target.state_dict()[name], tensor), (path.name, name)


def test_load_rejects_other_sizes(tmp_path):
    DualSpaceProjector(D_S, 16).save_pretrained(tmp_path / "wide.safetensors")
    with pytest.raises(ConfigError, match=r"t2s.0.weight has shape \(8, 16\), expected \(8, 12\)"):
        DualSpaceProjector(D_S, D_T).load_pretrained(tmp_path / "wide.safetensors")


def test_load_strict_reports_missing_and_extra(tmp_path):
    DualSpaceProjector(D_S, D_T, cross_attention=False).save_pretrained(tmp_path / "plain.safetensors")
    with pytest.raises(ConfigError, match=r"missing \['query.0.bias', 'query.0.weight'\]"):
        DualSpaceProjector(D_S, D_T).load_pretrained(tmp_path / "plain.safetensors")
    DualSpaceProjector(D_S, D_T).save_pretrained(tmp_path / "full.safetensors")
    plain = DualSpaceProjector(D_S, D_T, cross_attention=False)
    with pytest.raises(ConfigError, match="unexpected"):
        plain.load_pretrained(tmp_path / "full.safetensors")
    assert plain.load_pretrained(tmp_path / "full.safetensors", strict=False) == ["query.0.bias", "query.0.weight"]


def test_load_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="projector file not found"):
        DualSpaceProjector(D_S, D_T).load_pretrained(tmp_path / "absent.safetensors")


# --- Cross-model attention ------------------------------------------------------------


def test_projection_shapes_and_masks():
    batch = make_batch()
    result = project(DualSpaceProjector(D_S, D_T), batch)
    assert result.o_to_q.shape == (2, 7, V_S)
    assert result.q_to_o.shape == (2, 9, V_T)
    assert result.attention.shape == (2, 7, 9)
    assert torch.equal(result.student_mask, batch["student_labels"].ne(-100))
    assert torch.equal(result.teacher_mask, batch["teacher_labels"].ne(-100))
    assert torch.equal(result.kd_mask, result.student_mask)


def test_masked_attention_ignores_padded_pairs():
    result = project(DualSpaceProjector(D_S, D_T), make_batch())
    weights = result.attention
    row_sums = weights.sum(-1)
    torch.testing.assert_close(row_sums[result.student_mask], torch.ones(int(result.student_mask.sum())))
    assert not weights[~result.student_mask].any()
    assert not weights.transpose(1, 2)[~result.teacher_mask].any()


def test_masked_mode_independent_of_padding():
    torch.manual_seed(0)
    projector = DualSpaceProjector(D_S, D_T, compat="masked")
    batch = make_batch()
    plain = project(projector, batch)
    padded = project(projector, pad_right(batch, student_extra=3, teacher_extra=5))
    mask_s, mask_t = plain.student_mask, plain.teacher_mask
    torch.testing.assert_close(padded.o_to_q[:, :7][mask_s], plain.o_to_q[mask_s], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(padded.q_to_o[:, :9][mask_t], plain.q_to_o[mask_t], rtol=1e-5, atol=1e-6)


def test_dskd_mode_depends_on_padding():
    torch.manual_seed(0)
    projector = DualSpaceProjector(D_S, D_T, compat="dskd")
    batch = make_batch()
    plain = project(projector, batch)
    padded = project(projector, pad_right(batch, student_extra=3, teacher_extra=5))
    mask_s = plain.student_mask
    assert not torch.allclose(padded.o_to_q[:, :7][mask_s], plain.o_to_q[mask_s], rtol=1e-3)


def test_modes_agree_without_masked_positions():
    torch.manual_seed(0)
    masked = DualSpaceProjector(D_S, D_T, compat="masked")
    dskd = DualSpaceProjector(D_S, D_T, compat="dskd")
    dskd.load_state_dict(masked.state_dict())
    batch = make_batch()
    g = torch.Generator().manual_seed(5)
    batch["student_labels"] = torch.randint(0, V_S, (2, 7), generator=g)
    batch["teacher_labels"] = torch.randint(0, V_T, (2, 9), generator=g)
    torch.testing.assert_close(project(masked, batch).o_to_q, project(dskd, batch).o_to_q)
    torch.testing.assert_close(project(masked, batch).q_to_o, project(dskd, batch).q_to_o)


def test_row_without_teacher_tokens_stays_finite():
    projector = DualSpaceProjector(D_S, D_T)
    batch = make_batch()
    batch["teacher_labels"][1] = -100  # the second sample has no scored teacher position
    batch["student_hidden"].requires_grad_(True)
    result = project(projector, batch)
    assert torch.isfinite(result.o_to_q).all()
    assert torch.isfinite(result.q_to_o).all()
    assert not result.attention[1].any()
    loss = numerics.token_nll(numerics.log_softmax(result.o_to_q), batch["student_labels"]).sum()
    loss = loss + (numerics.kl(numerics.log_softmax(result.q_to_o), numerics.log_softmax(result.q_to_o.detach())) * result.teacher_mask).sum()
    loss.backward()
    for name, parameter in projector.named_parameters():
        assert torch.isfinite(parameter.grad).all(), name
    assert torch.isfinite(batch["student_hidden"].grad).all()


def test_gradients_reach_projectors_not_heads():
    projector = DualSpaceProjector(D_S, D_T)
    batch = make_batch()
    for name in ("student_hidden", "student_head", "teacher_head", "student_embedding", "teacher_embedding"):
        batch[name].requires_grad_(True)
    result = project(projector, batch)

    projected_ce = numerics.token_nll(numerics.log_softmax(result.o_to_q), batch["student_labels"]).sum()
    grads = torch.autograd.grad(projected_ce, [projector.query[0].weight, projector.t2s[0].weight, projector.s2t[0].weight, batch["student_head"]], allow_unused=True, retain_graph=True)
    assert grads[0].abs().sum() > 0
    assert grads[1].abs().sum() > 0
    assert grads[2] is None
    assert grads[3] is None

    teacher_logp = numerics.log_softmax(batch["teacher_hidden"] @ batch["teacher_head"].detach().T)
    s2t_kl = (numerics.kl(teacher_logp, numerics.log_softmax(result.q_to_o)) * result.teacher_mask).sum()
    leaves = [projector.s2t[0].weight, projector.query[0].weight, batch["student_hidden"], batch["teacher_head"], batch["teacher_embedding"]]
    grads = torch.autograd.grad(s2t_kl, leaves, allow_unused=True)
    assert all(grad.abs().sum() > 0 for grad in grads[:3])
    assert grads[3] is None
    assert grads[4] is None


def test_accuracy_gate():
    torch.manual_seed(0)
    batch = make_batch()
    gated = DualSpaceProjector(D_S, D_T, accuracy_gate=True)
    result = project(gated, batch)
    correct = result.o_to_q.argmax(-1).eq(batch["student_labels"])
    assert torch.equal(result.kd_mask, correct & result.student_mask)
    assert torch.equal(projected_accuracy(result.o_to_q, batch["student_labels"]), result.kd_mask)

    # Make the projected teacher right at one valid position and check the gate opens there.
    labels = batch["student_labels"].clone()
    labels[0, 4] = int(result.o_to_q[0, 4].argmax())
    batch["student_labels"] = labels
    reopened = project(gated, batch)
    assert bool(reopened.kd_mask[0, 4])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b: b.update(student_hidden=torch.randn(2, 7, 6)), r"student hidden states have shape \(2, 7, 6\), expected \[batch, length, 8\]"),
        (lambda b: b.update(teacher_labels=b["teacher_labels"][:, :5]), r"teacher labels have shape \(2, 5\) but the hidden states have \(2, 9\)"),
        (lambda b: b.update(teacher_embedding=torch.randn(V_T, D_S)), r"teacher embedding matrix has shape \(13, 8\)"),
        (lambda b: b.update(student_head=torch.randn(V_S, D_T)), r"student output head has shape \(11, 12\)"),
        (lambda b: b["teacher_input_ids"].__setitem__((0, 5), 40), "teacher token id 40 is outside the teacher embedding"),
        (lambda b: b.update(teacher_hidden=torch.randn(3, 9, D_T), teacher_labels=torch.zeros(3, 9, dtype=torch.long), teacher_input_ids=torch.zeros(3, 9, dtype=torch.long)), "batches differ in size: 2 vs 3"),
    ],
)
def test_projection_input_rejected(change, message):
    batch = make_batch()
    change(batch)
    with pytest.raises(ConfigError, match=message):
        project(DualSpaceProjector(D_S, D_T), batch)


# --- Same-length projection -----------------------------------------------------------


def test_aligned_projection_matches_formula():
    torch.manual_seed(0)
    projector = DualSpaceProjector(D_S, D_T, cross_attention=False)
    batch = make_batch(teacher_length=7)
    result = projector.project_aligned(
        batch["student_hidden"],
        batch["teacher_hidden"],
        student_labels=batch["student_labels"],
        teacher_labels=batch["teacher_labels"],
        student_head=batch["student_head"],
        teacher_head=batch["teacher_head"],
    )
    expected_o_to_q = projector.t2s(batch["teacher_hidden"]) @ batch["student_head"].T
    expected_q_to_o = projector.s2t(batch["student_hidden"]) @ batch["teacher_head"].T
    torch.testing.assert_close(result.o_to_q, expected_o_to_q)
    torch.testing.assert_close(result.q_to_o, expected_q_to_o)
    assert result.attention is None


def test_aligned_projection_rejects_lengths():
    batch = make_batch()
    with pytest.raises(ConfigError, match=r"position-aligned sequences .* \(2, 7\) and the teacher's \(2, 9\)"):
        DualSpaceProjector(D_S, D_T).project_aligned(
            batch["student_hidden"],
            batch["teacher_hidden"],
            student_labels=batch["student_labels"],
            teacher_labels=batch["teacher_labels"],
            student_head=batch["student_head"],
        )


# --- With real models -----------------------------------------------------------------


def tiny_llama(vocab: int, hidden: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
    )
    return LlamaForCausalLM(config)


def test_projection_with_transformers_models():
    student, teacher = tiny_llama(V_S, D_S, 0), tiny_llama(V_T, D_T, 1)
    projector = DualSpaceProjector.for_models(student, teacher)
    assert (projector.student_hidden_size, projector.teacher_hidden_size) == (D_S, D_T)
    batch = make_batch()
    student_ids = torch.cat([batch["student_input_ids"], batch["student_labels"][:, -1:].clamp_min(0)], dim=1)
    teacher_ids = torch.cat([batch["teacher_input_ids"], batch["teacher_labels"][:, -1:].clamp_min(0)], dim=1)
    student_out = student(student_ids, output_hidden_states=True)
    with torch.no_grad():
        teacher_out = teacher(teacher_ids, output_hidden_states=True)

    result = projector(
        student_out.hidden_states[-1][:, :-1],
        teacher_out.hidden_states[-1][:, :-1],
        student_input_ids=student_ids[:, :-1],
        student_labels=batch["student_labels"],
        teacher_input_ids=teacher_ids[:, :-1],
        teacher_labels=batch["teacher_labels"],
        student_embedding=student.get_input_embeddings(),
        teacher_embedding=teacher.get_input_embeddings(),
        student_head=student.get_output_embeddings(),
        teacher_head=teacher.get_output_embeddings(),
    )
    teacher_logp = numerics.log_softmax(teacher_out.logits[:, :-1])
    loss = (numerics.kl(teacher_logp, numerics.log_softmax(result.q_to_o)) * result.teacher_mask).sum()
    loss = loss + numerics.token_nll(numerics.log_softmax(result.o_to_q), batch["student_labels"]).sum()
    loss.backward()
    assert torch.isfinite(loss)
    assert student.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
    assert student.get_output_embeddings().weight.grad is None or not student.get_output_embeddings().weight.grad.any()
    assert all(parameter.grad is not None for parameter in projector.parameters())


# --- Padded output heads --------------------------------------------------------------

QWEN_TOKENS, STUDENT_ROWS, TEACHER_ROWS = 151936, 151936, 152064


def padded_logits():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(1, 3, STUDENT_ROWS, generator=g)
    teacher = torch.randn(1, 3, TEACHER_ROWS, generator=g)
    teacher[..., QWEN_TOKENS:] = 1e4  # padded rows must never receive probability
    return student, teacher


def test_align_heads_truncates_padded_rows():
    student, teacher = padded_logits()
    student.requires_grad_(True)
    student_real, teacher_real = align_heads(student, teacher, QWEN_TOKENS, policy="truncate")
    assert student_real.shape[-1] == teacher_real.shape[-1] == QWEN_TOKENS
    value = numerics.kl(numerics.log_softmax(teacher_real), numerics.log_softmax(student_real)).sum()
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(student.grad).all()
    expected = numerics.kl(
        numerics.log_softmax(teacher[..., :QWEN_TOKENS]), numerics.log_softmax(student.detach()[..., :QWEN_TOKENS])
    ).sum()
    torch.testing.assert_close(value.detach(), expected)


def test_align_heads_truncates_student_head():
    g = torch.Generator().manual_seed(1)
    student = torch.randn(1, 2, TEACHER_ROWS, generator=g).requires_grad_(True)
    teacher = torch.randn(1, 2, STUDENT_ROWS, generator=g)
    student_real, teacher_real = align_heads(student, teacher, QWEN_TOKENS)
    assert student_real.shape[-1] == teacher_real.shape[-1] == QWEN_TOKENS
    value = numerics.kl(numerics.log_softmax(teacher_real), numerics.log_softmax(student_real)).sum()
    value.backward()
    assert torch.isfinite(value)
    assert not student.grad[..., QWEN_TOKENS:].any()
    assert student.grad[..., :QWEN_TOKENS].abs().sum() > 0


def test_align_heads_error_policy_names_sizes():
    student, teacher = padded_logits()
    with pytest.raises(ConfigError) as caught:
        align_heads(student, teacher, QWEN_TOKENS, policy="error")
    message = str(caught.value)
    assert "151936 rows" in message
    assert "152064 rows" in message
    assert 'head.policy = "truncate"' in message


def test_align_heads_error_policy_accepts_equal_heads():
    logits = torch.zeros(1, 2, 20)
    student, teacher = align_heads(logits, logits + 1, 17, policy="error")
    assert student.shape[-1] == teacher.shape[-1] == 20


@pytest.mark.parametrize(
    ("vocab_size", "policy", "message"),
    [
        (25, "truncate", "the student output head has 20 rows but the tokenizer has 25 tokens"),
        (0, "truncate", "vocab_size must be the tokenizer's length"),
        (17, "pad", "invalid head policy 'pad'"),
    ],
)
def test_align_heads_rejected(vocab_size, policy, message):
    with pytest.raises(KdslError, match=message):
        align_heads(torch.zeros(1, 2, 20), torch.zeros(1, 2, 30), vocab_size, policy=policy)


# --- Re-tokenisation ------------------------------------------------------------------

SENTENCES = [
    "The river runs past the old mill, and the miller counts his sacks twice.",
    "A café on the corner sells bread to naïve travellers at twice the price.",
    "Numbers such as 12, 345 and 6789 appear in the ledger beside each name.",
    "She said: “the tide turns at noon”, then walked back along the pier.",
    "Wind, rain and frost wear the stones; moss grows where the water stands.",
    "Every evening the lamps are lit one by one along the harbour wall.",
    "Children chase gulls across the sand while the boats come home. 🙂",
    "The baker rises at four, kneads the dough and waits for it to prove.",
]
CORPUS = [" ".join(SENTENCES[i:] + SENTENCES[:i]) for i in range(len(SENTENCES))] * 6  # about 25 KB


@pytest.fixture(scope="module")
def byte_bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


@pytest.fixture(scope="module")
def unigram():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=200, special_tokens=["<unk>", "</s>"], unk_token="<unk>")
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def check_alignment(alignment, teacher_tokenizer):
    text = alignment.text
    encoded = teacher_tokenizer.encode(text, add_special_tokens=False).ids
    assert alignment.teacher_ids[: len(encoded)] == encoded
    assert len(alignment.student_offsets) == len(alignment.student_ids)
    assert len(alignment.student_to_teacher) == len(alignment.student_ids)
    assert len(alignment.teacher_to_student) == len(alignment.teacher_ids)
    ends = [end for _, end in alignment.student_offsets]
    assert ends == sorted(ends)
    assert ends[-1] == len(text)
    for index, (start, end) in enumerate(alignment.student_offsets):
        first, last = alignment.student_to_teacher[index]
        if end <= start:
            continue
        assert first < last, f"student token {index} {text[start:end]!r} maps to no teacher token"
        covered_start = alignment.teacher_offsets[first][0]
        covered_end = alignment.teacher_offsets[last - 1][1]
        assert covered_start <= start, (index, text[start:end])
        assert end <= covered_end, (index, text[start:end])


def test_retokenize_unigram_to_bpe(unigram, byte_bpe):
    text = "The miller counts the boats along the harbour wall."
    student_ids = unigram.encode(text).ids
    alignment = retokenize(student_ids, unigram, byte_bpe)
    assert alignment.text == unigram.decode(student_ids)
    assert alignment.teacher_ids == byte_bpe.encode(alignment.text).ids
    assert max(alignment.teacher_ids) < byte_bpe.get_vocab_size()
    assert byte_bpe.decode(alignment.teacher_ids) == alignment.text
    check_alignment(alignment, byte_bpe)


def test_retokenize_bpe_to_unigram_multibyte(byte_bpe, unigram):
    text = "A naïve café 🙂 sells bread."
    student_ids = byte_bpe.encode(text).ids
    alignment = retokenize(student_ids, byte_bpe, unigram)
    assert alignment.text == text
    assert "\ufffd" not in alignment.text
    smile = text.index("🙂")
    emoji_tokens = [i for i, (start, end) in enumerate(alignment.student_offsets) if start <= smile < end]
    assert len(emoji_tokens) >= 2, "the emoji should be split across several byte-level tokens"
    assert len({alignment.student_offsets[i] for i in emoji_tokens}) == 1
    check_alignment(alignment, unigram)


def test_retokenize_keeps_leading_space_with_context(unigram, byte_bpe):
    prompt = unigram.encode("The baker rises at four,").ids
    response = unigram.encode("The baker rises at four, kneads the dough").ids[len(prompt) :]
    alone = retokenize(response, unigram, byte_bpe)
    in_context = retokenize(response, unigram, byte_bpe, context_ids=prompt)
    assert in_context.text == " kneads the dough"
    assert not alone.text.startswith(" ")
    assert in_context.teacher_ids == byte_bpe.encode(" kneads the dough").ids
    check_alignment(in_context, byte_bpe)


def test_retokenize_maps_final_eos(unigram, byte_bpe):
    student_eos, teacher_eos = unigram.token_to_id("</s>"), byte_bpe.token_to_id("<|endoftext|>")
    student_ids = unigram.encode("the tide turns").ids + [student_eos]
    alignment = retokenize(student_ids, unigram, byte_bpe, student_eos_id=student_eos, teacher_eos_id=teacher_eos)
    assert alignment.text == "the tide turns"
    assert alignment.teacher_ids[-1] == teacher_eos
    assert alignment.teacher_ids[:-1] == byte_bpe.encode("the tide turns").ids
    assert alignment.student_to_teacher[-1] == (len(alignment.teacher_ids) - 1, len(alignment.teacher_ids))
    assert alignment.teacher_to_student[-1] == (len(student_ids) - 1, len(student_ids))


def test_retokenize_needs_teacher_eos(unigram, byte_bpe):
    student_eos = unigram.token_to_id("</s>")
    with pytest.raises(ConfigError, match="teacher_eos_id="):
        retokenize(unigram.encode("the tide").ids + [student_eos], unigram, byte_bpe, student_eos_id=student_eos)


def test_retokenize_transformers_tokenizers(unigram, byte_bpe):
    from transformers import PreTrainedTokenizerFast

    student = PreTrainedTokenizerFast(tokenizer_object=unigram, eos_token="</s>", unk_token="<unk>")
    teacher = PreTrainedTokenizerFast(tokenizer_object=byte_bpe, eos_token="<|endoftext|>")
    ids = torch.tensor(student("moss grows where the water stands", add_special_tokens=False)["input_ids"] + [student.eos_token_id])
    alignment = retokenize(ids, student, teacher)
    assert alignment.teacher_ids[-1] == teacher.eos_token_id
    assert teacher.decode(alignment.teacher_ids, skip_special_tokens=True) == "moss grows where the water stands"


def test_retokenize_batch_uses_contexts(unigram, byte_bpe):
    prompts = [unigram.encode("Wind, rain").ids, unigram.encode("Every evening").ids]
    full = [unigram.encode("Wind, rain and frost").ids, unigram.encode("Every evening the lamps").ids]
    responses = [row[len(prompt) :] for row, prompt in zip(full, prompts)]
    alignments = retokenize_batch(responses, unigram, byte_bpe, contexts=prompts)
    assert [a.text for a in alignments] == [" and frost", " the lamps"]
    with pytest.raises(ConfigError, match="2 sequences but 1 contexts"):
        retokenize_batch(responses, unigram, byte_bpe, contexts=prompts[:1])


def test_retokenize_rejects_foreign_ids(unigram, byte_bpe):
    foreign = byte_bpe.encode("the harbour wall").ids
    foreign.append(unigram.get_vocab_size() + 5)
    with pytest.raises(ConfigError, match="outside the student tokenizer's vocabulary"):
        retokenize(foreign, unigram, byte_bpe)


def test_retokenize_rejects_tokenizer_without_offsets(byte_bpe):
    with pytest.raises(ConfigError, match="has no fast backend"):
        retokenize([1, 2], object(), byte_bpe)


BUILTIN_TOKENIZERS = Path(__file__).resolve().parents[1] / "kdsl" / "builtins" / "tokenizers"


@pytest.mark.skipif(
    not (BUILTIN_TOKENIZERS / "unigram-3000" / "tokenizer.json").exists()
    or not (BUILTIN_TOKENIZERS / "bpe-4096" / "tokenizer.json").exists(),
    reason="the builtin tokenizers bpe-4096 and unigram-3000 are not in this checkout",
)
@pytest.mark.parametrize(("student_name", "teacher_name"), [("unigram-3000", "bpe-4096"), ("bpe-4096", "unigram-3000")])
def test_retokenize_builtin_tokenizers(student_name, teacher_name):
    from tokenizers import Tokenizer

    student = Tokenizer.from_file(str(BUILTIN_TOKENIZERS / student_name / "tokenizer.json"))
    teacher = Tokenizer.from_file(str(BUILTIN_TOKENIZERS / teacher_name / "tokenizer.json"))
    prompt = "ROMEO:\nBut soft, what light"
    prompt_ids = student.encode(prompt).ids
    full_ids = student.encode(prompt + " through yonder window breaks?").ids
    assert full_ids[: len(prompt_ids)] == prompt_ids
    alignment = retokenize(full_ids[len(prompt_ids) :], student, teacher, context_ids=prompt_ids)
    assert alignment.text == " through yonder window breaks?"
    assert alignment.teacher_ids == teacher.encode(alignment.text).ids
    check_alignment(alignment, teacher)


# --- Text alignment -------------------------------------------------------------------


def text_batch(seed: int = 0):
    """A batch whose rows have read the text up to these character counts (one valid row, one with padding)."""
    batch = make_batch(seed, student_length=5, teacher_length=6)
    batch["student_labels"][0, :1] = -100
    batch["student_labels"][0, 1:] = torch.tensor([1, 2, 3, 4])
    batch["teacher_labels"][0, :1] = -100
    batch["teacher_labels"][0, 1:] = torch.tensor([1, 2, 3, 4, 5])
    batch["student_labels"][1] = torch.tensor([-100, 1, 2, -100, -100])
    batch["teacher_labels"][1] = torch.tensor([-100, 1, 2, 3, -100, -100])
    batch["student_ends"] = torch.tensor([[0, 0, 2, 5, 7], [0, 3, 6, -1, -1]])
    batch["teacher_ends"] = torch.tensor([[0, 0, 2, 3, 5, 7], [0, 1, 3, 6, -1, -1]])
    return batch


def test_text_alignment_pairs_same_text():
    torch.manual_seed(0)
    projector = DualSpaceProjector(D_S, D_T, alignment="text")
    batch = text_batch()
    projection = project(projector, batch)
    weights = projection.attention
    # Row 0: student ends 0, 2, 5, 7 read what teacher positions 1, 2, 4, 5 read (end 0 of position 0 is a
    # prompt position, not scored). Row 1: student ends 3, 6 match teacher positions 2, 3.
    expected = torch.zeros_like(weights)
    for row, pairs in ((0, ((1, 1), (2, 2), (3, 4), (4, 5))), (1, ((1, 2), (2, 3)))):
        for student, teacher in pairs:
            expected[row, student, teacher] = 1.0
    torch.testing.assert_close(weights, expected)
    # o→q at a student position is the read-out of the one teacher position it attends to.
    values = batch["teacher_hidden"] / projector._std(batch["teacher_hidden"], projection.teacher_mask)
    nxt = nn.functional.embedding(torch.where(projection.teacher_mask, batch["teacher_labels"], 0), batch["teacher_embedding"])
    values = projector.t2s(values + nxt / projector._std(nxt, projection.teacher_mask))
    torch.testing.assert_close(projection.o_to_q[0, 3], values[0, 4] @ batch["student_head"].T)


def test_text_alignment_falls_back_earlier():
    torch.manual_seed(0)
    projector = DualSpaceProjector(D_S, D_T, alignment="text")
    batch = text_batch()
    student_hidden = batch["student_hidden"].clone().requires_grad_(True)
    arguments = dict(batch, student_hidden=student_hidden)
    projection = project(projector, arguments)
    # Teacher position 3 of row 0 has read 3 characters. No student position ends there, so it reads the one that
    # ends latest before: position 2, at 2 characters.
    # Row 1: teacher end 1 falls back to student end 0, a prompt position, so that row gets no weight. Ends 3 and 6
    # read student positions 1 and 2.
    student_hidden.grad = None
    projection.q_to_o[0, 3].sum().backward(retain_graph=True)
    moved = student_hidden.grad.abs().sum(dim=-1)
    assert moved[0].nonzero().flatten().tolist() == [2]
    assert bool((moved[1] == 0).all())
    student_hidden.grad = None
    projection.q_to_o[1, 1].sum().backward(retain_graph=True)
    assert bool((student_hidden.grad.abs().sum(dim=-1) == 0).all())
    student_hidden.grad = None
    projection.q_to_o[1, 3].sum().backward()
    assert student_hidden.grad.abs().sum(dim=-1)[1].nonzero().flatten().tolist() == [2]


def test_text_alignment_never_reads_ahead():
    """Changing what the other model computes at later text leaves earlier projections unchanged."""
    torch.manual_seed(0)
    projector = DualSpaceProjector(D_S, D_T, alignment="text")
    batch = text_batch()
    before = project(projector, batch)
    changed = dict(batch)
    changed["teacher_hidden"] = batch["teacher_hidden"].clone()
    changed["student_hidden"] = batch["student_hidden"].clone()
    # Reversing a hidden vector keeps the batch statistics that scale the teacher side.
    changed["teacher_hidden"][0, 5] = batch["teacher_hidden"][0, 5].flip(-1)  # the teacher has read 7 characters there
    changed["student_hidden"][0, 4] = batch["student_hidden"][0, 4].flip(-1)  # the student has read 7 characters there
    after = project(projector, changed)
    torch.testing.assert_close(after.o_to_q[0, :4], before.o_to_q[0, :4])
    torch.testing.assert_close(after.q_to_o[0, :5], before.q_to_o[0, :5])
    assert not torch.allclose(after.o_to_q[0, 4], before.o_to_q[0, 4])
    # The learned alignment lets every position read every other one.
    learned = DualSpaceProjector(D_S, D_T)
    learned.load_state_dict(projector.state_dict())
    assert not torch.allclose(project(learned, changed).o_to_q[0, :4], project(learned, batch).o_to_q[0, :4])


def test_text_alignment_needs_ends():
    projector = DualSpaceProjector(D_S, D_T, alignment="text")
    batch = text_batch()
    del batch["teacher_ends"]
    with pytest.raises(ConfigError, match="needs teacher_ends"):
        project(projector, batch)
    batch = text_batch()
    batch["student_ends"] = batch["student_ends"][:, :-1]
    with pytest.raises(ConfigError, match=r"student_ends have shape \(2, 4\)"):
        project(projector, batch)
