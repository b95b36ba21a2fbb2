"""Tests of kdsl.evaluate on tiny GPT-2 models and a character-level tokenizer built here."""

from __future__ import annotations

import copy
import json
import math
import os
import string

import numpy as np
import pytest
import torch
from rouge_score import rouge_scorer
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from kdsl import evaluate as ev
from kdsl.errors import ConfigError

PAIRS = [
    {"prompt": "To be, or not", "response": " to be: that is the question."},
    {"prompt": "Now is", "response": " the winter of our discontent"},
    {"prompt": "O Romeo, Romeo! wherefore art thou", "response": " Romeo?"},
    {"prompt": "All", "response": " the world's a stage,\nand all the men and women merely players"},
    {"prompt": "Friends, Romans, countrymen,", "response": " lend me your ears;"},
]


def _char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character of printable ASCII, plus <pad>, <eos> and <unk>."""
    symbols = ["<pad>", "<eos>", "<unk>"] + list(string.digits + string.ascii_letters + string.punctuation + " \n")
    model = models.WordLevel({s: i for i, s in enumerate(symbols)}, unk_token="<unk>")
    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _gpt2(tokenizer, seed: int, n_layer: int = 1, **overrides) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    options = dict(
        vocab_size=len(tokenizer), n_positions=256, n_embd=32, n_layer=n_layer, n_head=2,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = GPT2Config(**{**options, **overrides})
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return _char_tokenizer()


@pytest.fixture(scope="module")
def teacher(tokenizer):
    return _gpt2(tokenizer, seed=0)


@pytest.fixture(scope="module")
def student(tokenizer):
    return _gpt2(tokenizer, seed=1)


@pytest.fixture(scope="module")
def positional(tokenizer):
    """A student whose output changes when a token moves to another position."""
    model = _gpt2(tokenizer, seed=1)
    with torch.no_grad():
        model.transformer.wpe.weight.mul_(50.0)
    return model


# --- Exposure-bias table from per-step losses -------------------------------------------


def test_exposure_table_hand_computed():
    oracle = [[1.0, 3.0], [3.0, 1.0]]  # ε_t = [2, 2]
    own = [[2.0, 4.0], [4.0, 8.0]]  # per-step means [3, 6], L = [3, 9]
    result = ev.exposure_bias_from_losses(oracle, own)
    assert result.l == [1, 2]
    assert result.eps_t == pytest.approx([2.0, 2.0])
    assert result.eps_le == pytest.approx([2.0, 2.0])
    assert result.loss_le == pytest.approx([3.0, 9.0])
    assert result.acc_err == pytest.approx([1.5, 4.5])
    # (L − l·ε_{≤l}) / (l·ε_{≤l}) · 100 = (3 − 2)/2·100 and (9 − 4)/4·100.
    assert result.ex_acc_err == pytest.approx([50.0, 125.0])


def test_exposure_eps_le_is_a_mean():
    oracle = np.tile([1.0, 2.0, 3.0], (3, 1))
    result = ev.exposure_bias_from_losses(oracle, oracle)
    assert result.eps_le == pytest.approx([1.0, 1.5, 2.0])
    assert result.loss_le == pytest.approx([1.0, 3.0, 6.0])
    assert result.acc_err == pytest.approx([1.0, 2.0, 3.0])
    assert result.ex_acc_err == pytest.approx([0.0, 0.0, 0.0])


def test_exposure_zero_error_gives_zero_excess():
    zeros = np.zeros((4, 3))
    result = ev.exposure_bias_from_losses(zeros, zeros, bootstrap=50)
    assert result.acc_err == [1.0, 2.0, 3.0]
    assert result.ex_acc_err == [0.0, 0.0, 0.0]
    assert result.ex_acc_err_ci == ([0.0] * 3, [0.0] * 3)
    assert all("matches teacher" in note for note in result.notes)


def test_exposure_zero_oracle_error_is_infinite():
    own = np.zeros((2, 2))
    own[0, 1] = 0.5
    result = ev.exposure_bias_from_losses(np.zeros((2, 2)), own)
    assert result.ex_acc_err[0] == 0.0
    assert result.ex_acc_err[1] == math.inf
    assert result.acc_err[1] == math.inf
    assert "+inf" in result.notes[1]


def test_bootstrap_band_contains_point():
    rng = np.random.default_rng(0)
    oracle = rng.gamma(2.0, 0.5, size=(40, 6))
    own = rng.gamma(2.0, 0.7, size=(40, 6)) * np.arange(1, 7)
    result = ev.exposure_bias_from_losses(oracle, own, bootstrap=400, seed=3)
    for name in ev.ExposureBiasResult.COLUMNS:
        point = np.array(getattr(result, name))
        low, high = (np.array(band) for band in getattr(result, f"{name}_ci"))
        assert np.all(low <= point), name
        assert np.all(point <= high), name
        assert np.all(low < high), name


def test_bootstrap_is_seeded():
    rng = np.random.default_rng(1)
    oracle, own = rng.random((20, 4)), rng.random((20, 4))
    first = ev.exposure_bias_from_losses(oracle, own, bootstrap=100, seed=5)
    second = ev.exposure_bias_from_losses(oracle, own, bootstrap=100, seed=5)
    other = ev.exposure_bias_from_losses(oracle, own, bootstrap=100, seed=6)
    assert first.ex_acc_err_ci == second.ex_acc_err_ci
    assert first.ex_acc_err_ci != other.ex_acc_err_ci


def test_bootstrap_zero_gives_nan_band():
    result = ev.exposure_bias_from_losses(np.ones((3, 2)), np.ones((3, 2)), bootstrap=0)
    assert all(math.isnan(v) for v in result.ex_acc_err_ci[0] + result.ex_acc_err_ci[1])


def test_exposure_losses_shape_mismatch_rejected():
    with pytest.raises(ConfigError, match=r"\(2, 3\) and \(2, 2\)"):
        ev.exposure_bias_from_losses(np.ones((2, 3)), np.ones((2, 2)))


# --- Held-out metrics --------------------------------------------------------------------


def _manual_heldout(student, teacher, tokenizer, pairs):
    """Score each pair alone, without padding: NLL and KL over the response tokens and the EOS after them."""
    nll = kl = 0.0
    tokens = chars = 0
    for pair in pairs:
        prompt = tokenizer(pair["prompt"])["input_ids"]
        response = tokenizer(pair["response"])["input_ids"] + [tokenizer.eos_token_id]
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logp_s = torch.log_softmax(student(ids).logits[0].double(), -1)
            logp_t = torch.log_softmax(teacher(ids).logits[0].double(), -1)
        for r, token in enumerate(response):
            position = len(prompt) - 1 + r
            nll -= logp_s[position, token].item()
            p_t = logp_t[position].exp()
            kl += (p_t * (logp_t[position] - logp_s[position])).sum().item()
        tokens += len(response)
        chars += len(pair["response"])
    return nll / tokens, nll / math.log(2) / chars, kl / tokens, tokens, chars


def test_heldout_matches_manual_scoring(student, teacher, tokenizer):
    result = ev.heldout_metrics(student, teacher, tokenizer, PAIRS, batch_size=2)
    ce, bpc, kl, tokens, chars = _manual_heldout(student, teacher, tokenizer, PAIRS)
    assert result.num_tokens == tokens
    assert result.num_chars == chars
    assert result.ce == pytest.approx(ce, rel=1e-5)
    assert result.bpc == pytest.approx(bpc, rel=1e-5)
    assert result.kl == pytest.approx(kl, rel=1e-4)
    assert result.perplexity == pytest.approx(math.exp(ce), rel=1e-5)


def test_paired_difference_matches_hand_computation(student, teacher, tokenizer):
    a = ev.heldout_metrics(student, None, tokenizer, PAIRS, bootstrap=200)
    b = ev.heldout_metrics(teacher, None, tokenizer, PAIRS, bootstrap=200)
    assert list(a.pair_tokens) == list(b.pair_tokens)
    assert a.pair_nll.sum() / a.pair_tokens.sum() == pytest.approx(a.ce, rel=1e-12)
    paired = ev.paired_ce_difference(a, b, bootstrap=200)
    assert paired.difference == pytest.approx(a.ce - b.ce, rel=1e-9)
    assert paired.num_pairs == len(PAIRS)
    per_pair = (a.pair_nll - b.pair_nll) / a.pair_tokens
    assert paired.wins == int((per_pair < 0).sum())
    low, high = paired.ci
    assert low <= paired.difference <= high
    # A model against itself differs by exactly nothing on every resample.
    same = ev.paired_ce_difference(a, a, bootstrap=50)
    assert same.difference == 0.0
    assert same.ci == (0.0, 0.0)
    assert same.wins == 0
    assert "pair_nll" not in a.summary()
    json.dumps(a.summary())


def test_paired_difference_rejects_other_pairs(student, tokenizer):
    a = ev.heldout_metrics(student, None, tokenizer, PAIRS)
    b = ev.heldout_metrics(student, None, tokenizer, PAIRS[:-1])
    with pytest.raises(ConfigError, match="same pairs"):
        ev.paired_ce_difference(a, b)


def test_heldout_prompt_tokens_never_count(student, tokenizer):
    short = [{"prompt": "a", "response": " the end"}]
    long = [{"prompt": "a much longer prompt, with many characters", "response": " the end"}]
    first = ev.heldout_metrics(student, None, tokenizer, short)
    second = ev.heldout_metrics(student, None, tokenizer, long)
    assert first.num_tokens == second.num_tokens == len(" the end") + 1  # the characters and the EOS
    assert first.ce != second.ce


def test_heldout_batched_equals_single(positional, teacher, tokenizer):
    batched = ev.heldout_metrics(positional, teacher, tokenizer, PAIRS, batch_size=5)
    single = ev.heldout_metrics(positional, teacher, tokenizer, PAIRS, batch_size=1)
    assert batched.ce == pytest.approx(single.ce, rel=1e-6)
    assert batched.kl == pytest.approx(single.kl, rel=1e-5)


def test_heldout_student_is_teacher(teacher, tokenizer):
    result = ev.heldout_metrics(teacher, teacher, tokenizer, PAIRS, bootstrap=50)
    assert result.kl == 0.0
    assert result.kl_ci == (0.0, 0.0)
    assert result.ce == pytest.approx(result.teacher_ce)


def test_heldout_without_teacher(student, tokenizer):
    result = ev.heldout_metrics(student, None, tokenizer, PAIRS)
    assert result.kl is None
    assert result.teacher_ce is None
    assert result.ce > 0


def test_heldout_truncation(student, tokenizer):
    result = ev.heldout_metrics(student, None, tokenizer, PAIRS, max_prompt_tokens=2, max_response_tokens=3)
    assert result.num_tokens == 3 * len(PAIRS)  # every response is cut, so none ends with the EOS
    assert result.num_chars == 3 * len(PAIRS)  # one character per token


def test_heldout_eos_only_when_response_fits(student, tokenizer):
    pair = [{"prompt": "a", "response": "abcd"}]
    fits = ev.heldout_metrics(student, None, tokenizer, pair, max_response_tokens=5)
    exact = ev.heldout_metrics(student, None, tokenizer, pair, max_response_tokens=4)
    assert fits.num_tokens == 5  # four characters and the EOS
    assert exact.num_tokens == 4  # the EOS falls past the limit, as in training
    assert fits.num_chars == exact.num_chars == 4


def test_heldout_ce_matches_trainer_on_builtin():
    from accelerate import Accelerator

    from kdsl.data import load_pairs
    from kdsl.models import load_model, load_tokenizer
    from kdsl.samplers import PairEncoder
    from kdsl.train import heldout_ce

    tokenizer = load_tokenizer("builtin:tiny-student")
    model = load_model("builtin:tiny-student").eval()
    pairs = load_pairs("builtin:shakespeare", "validation").select(range(6))
    # A limit of 12 tokens cuts some responses (no EOS) and leaves others whole (EOS scored).
    lengths = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in pairs["response"]]
    assert min(lengths) < 12 <= max(lengths)

    encoder = PairEncoder(tokenizer, max_prompt_tokens=32, max_response_tokens=12)
    trainer = heldout_ce(Accelerator(cpu=True), model, encoder, pairs, max_pairs=6, batch_size=4)
    result = ev.heldout_metrics(model, None, tokenizer, pairs, batch_size=3, max_prompt_tokens=32,
                                max_response_tokens=12)
    assert result.num_tokens == sum(min(n + 1, 12) for n in lengths)
    assert result.ce == pytest.approx(trainer, rel=1e-5)


def test_heldout_bootstrap_band(student, teacher, tokenizer):
    result = ev.heldout_metrics(student, teacher, tokenizer, PAIRS, bootstrap=200, seed=0)
    for name in ("ce", "bpc", "kl"):
        low, high = getattr(result, f"{name}_ci")
        assert low <= getattr(result, name) <= high, name


def test_heldout_accepts_dataset(student, tokenizer):
    datasets = pytest.importorskip("datasets")
    from_list = ev.heldout_metrics(student, None, tokenizer, PAIRS)
    from_dataset = ev.heldout_metrics(student, None, tokenizer, datasets.Dataset.from_list(PAIRS))
    assert from_dataset.ce == from_list.ce


def test_pairs_missing_response_rejected(student, tokenizer):
    with pytest.raises(ConfigError, match=r"pair 1: 'response' is missing"):
        ev.heldout_metrics(student, None, tokenizer, [PAIRS[0], {"prompt": "x"}])


def test_pairs_empty_response_rejected(student, tokenizer):
    with pytest.raises(ConfigError, match=r"pair 0 has an empty response"):
        ev.heldout_metrics(student, None, tokenizer, [{"prompt": "x", "response": ""}])


def test_invalid_batch_size_rejected(student, tokenizer):
    with pytest.raises(ConfigError, match=r"batch_size must be a positive integer, got 0"):
        ev.heldout_metrics(student, None, tokenizer, PAIRS, batch_size=0)


def test_context_overflow_rejected(student, tokenizer):
    prompts = [tokenizer("abc")["input_ids"]]
    with pytest.raises(ConfigError, match=r"at most 256 positions but a sequence needs 303"):
        ev.generate_continuations(student, tokenizer, prompts, max_new_tokens=300, greedy=True)


def test_small_head_rejected(tokenizer):
    small = GPT2LMHeadModel(GPT2Config(vocab_size=10, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ConfigError, match=r"10 output rows but the tokenizer has \d+ tokens"):
        ev.heldout_metrics(small, None, tokenizer, PAIRS)


# --- Generation and ROUGE-L ---------------------------------------------------------------


def test_greedy_batched_equals_single(positional, tokenizer):
    prompts = [tokenizer(p["prompt"])["input_ids"] for p in PAIRS]
    batched = ev.generate_continuations(positional, tokenizer, prompts, max_new_tokens=6, greedy=True, batch_size=5)
    single = ev.generate_continuations(positional, tokenizer, prompts, max_new_tokens=6, greedy=True, batch_size=1)
    assert batched == single
    assert all(len(c) <= 6 for c in batched)


def test_left_padding_needs_mask_positions(positional, tokenizer):
    """With positions counted from the padded edge, the first greedy token would differ."""
    prompts = [tokenizer(p["prompt"])["input_ids"] for p in PAIRS]
    single = ev.generate_continuations(positional, tokenizer, prompts, max_new_tokens=1, greedy=True, batch_size=1)
    input_ids, attention_mask = ev._left_padded(prompts, tokenizer.pad_token_id, torch.device("cpu"))
    shifted = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    with torch.no_grad():
        logits = positional(input_ids=input_ids, attention_mask=attention_mask, position_ids=shifted).logits
    assert logits[:, -1].argmax(-1).tolist() != [c[0] for c in single]


def test_generation_ignores_model_defaults(student, tokenizer):
    prompts = [tokenizer("hello")["input_ids"]]
    plain = ev.generate_continuations(student, tokenizer, prompts, max_new_tokens=8, greedy=True)
    model = copy.deepcopy(student)
    model.generation_config.repetition_penalty = 50.0
    model.generation_config.no_repeat_ngram_size = 1
    assert ev.generate_continuations(model, tokenizer, prompts, max_new_tokens=8, greedy=True) == plain
    assert model.generation_config.repetition_penalty == 50.0


def test_sampling_keeps_caller_rng_and_mode(student, tokenizer):
    student.train()
    state = torch.get_rng_state()
    prompts = [tokenizer("hello")["input_ids"]] * 3
    first = ev.generate_continuations(student, tokenizer, prompts, max_new_tokens=5, greedy=False, seed=7)
    second = ev.generate_continuations(student, tokenizer, prompts, max_new_tokens=5, greedy=False, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert student.training
    student.eval()
    assert first == second


def test_padded_head_never_generates_extra_ids(tokenizer):
    model = _gpt2(tokenizer, seed=2, vocab_size=len(tokenizer) + 30)
    with torch.no_grad():
        model.lm_head.weight[len(tokenizer) :] = 5.0 * model.lm_head.weight.norm(dim=-1).max()
    prompts = [tokenizer("abc")["input_ids"]] * 4
    out = ev.generate_continuations(model, tokenizer, prompts, max_new_tokens=10, greedy=False, seed=0)
    assert all(token < len(tokenizer) for row in out for token in row)


def test_rouge_l_of_own_output_is_one(student, tokenizer):
    first = ev.rouge_l(student, tokenizer, PAIRS, max_new_tokens=12)
    scored = [{"prompt": p["prompt"], "response": g} for p, g in zip(PAIRS, first.generations)]
    second = ev.rouge_l(student, tokenizer, scored, max_new_tokens=12)
    expected = [1.0 if any(c.isalnum() for c in g) else 0.0 for g in first.generations]
    assert second.scores == expected


def test_rouge_l_matches_rouge_score(student, tokenizer):
    result = ev.rouge_l(student, tokenizer, PAIRS, max_new_tokens=12, bootstrap=100)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    direct = [scorer.score(p["response"], g)["rougeL"].fmeasure for p, g in zip(PAIRS, result.generations)]
    assert result.scores == direct
    assert result.f1 == pytest.approx(sum(direct) / len(direct))
    assert result.f1_ci[0] <= result.f1 <= result.f1_ci[1]


# --- Exposure bias on models ---------------------------------------------------------------


def test_exposure_copy_of_teacher(teacher, tokenizer):
    result = ev.exposure_bias(copy.deepcopy(teacher), teacher, tokenizer, PAIRS, max_l=6, bootstrap=100, seed=0)
    assert result.eps_t == [0.0] * 6
    assert result.loss_le == [0.0] * 6
    assert result.acc_err == [float(l) for l in range(1, 7)]
    assert result.ex_acc_err == [0.0] * 6
    low, high = result.ex_acc_err_ci
    assert all(lo <= 0.0 <= hi for lo, hi in zip(low, high))


def test_exposure_is_reproducible(student, teacher, tokenizer):
    first = ev.exposure_bias(student, teacher, tokenizer, PAIRS, max_l=4, bootstrap=20, seed=3)
    second = ev.exposure_bias(student, teacher, tokenizer, PAIRS, max_l=4, bootstrap=20, seed=3)
    assert first == second
    assert all(v > 0 for v in first.eps_t)


def _context_free(tokenizer, seed: int) -> GPT2LMHeadModel:
    """A model whose next-token distribution ignores the context; EOS gets logit -1000."""
    model = _gpt2(tokenizer, seed=seed, tie_word_embeddings=False)
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()  # the final hidden state is ln_f.bias for every input
        bias = model.transformer.ln_f.bias
        bias.copy_(torch.randn_like(bias))
        model.lm_head.weight[tokenizer.eos_token_id] = -1000.0 * bias / bias.dot(bias)
    return model


def test_exposure_context_free_models(tokenizer):
    teacher, student = _context_free(tokenizer, 10), _context_free(tokenizer, 11)
    with torch.no_grad():
        probe = torch.tensor([[5, 6]])
        logp_t = torch.log_softmax(teacher(probe).logits[0, -1].double(), -1)
        logp_s = torch.log_softmax(student(probe).logits[0, -1].double(), -1)
    step_kl = (logp_t.exp() * (logp_t - logp_s)).sum().item()

    result = ev.exposure_bias(student, teacher, tokenizer, PAIRS, max_l=5, bootstrap=50, seed=1)
    assert result.alive_oracle == [1.0] * 5
    assert result.alive_student == [1.0] * 5
    assert result.eps_t == pytest.approx([step_kl] * 5, rel=1e-4)
    assert result.loss_le == pytest.approx([step_kl * l for l in range(1, 6)], rel=1e-4)
    assert result.acc_err == pytest.approx([1.0, 2.0, 3.0, 4.0, 5.0], rel=1e-4)
    assert result.ex_acc_err == pytest.approx([0.0] * 5, abs=1e-2)


def _bigram(tokenizer, seed: int) -> GPT2LMHeadModel:
    """A model whose next token depends only on the last token: no blocks, no position embeddings."""
    model = _gpt2(tokenizer, seed=seed, n_layer=0, tie_word_embeddings=False)
    with torch.no_grad():
        model.transformer.wpe.weight.zero_()
        model.lm_head.weight.mul_(30.0)  # sharper rows make the error depend strongly on the prefix
    return model


def _transition_matrix(model, vocab: int) -> np.ndarray:
    with torch.no_grad():
        logits = model(torch.arange(vocab).unsqueeze(1)).logits[:, 0, :vocab]
    return torch.softmax(logits.double(), -1).numpy()


def test_exposure_bigram_matches_exact_expectation(tokenizer):
    teacher, student = _bigram(tokenizer, 20), _bigram(tokenizer, 21)
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    p_t, p_s = _transition_matrix(teacher, vocab), _transition_matrix(student, vocab)
    step_kl = (p_t * (np.log(p_t) - np.log(p_s))).sum(-1)
    # After EOS a continuation stops: EOS is absorbing and costs nothing.
    step_kl[eos] = 0.0
    for matrix in (p_t, p_s):
        matrix[eos] = np.eye(vocab)[eos]

    max_l, prompt = 4, "xy"
    state_t = state_s = np.eye(vocab)[tokenizer(prompt)["input_ids"][-1]]
    eps_exact, loss_exact = [], []
    for _ in range(max_l):
        eps_exact.append(state_t @ step_kl)
        loss_exact.append(state_s @ step_kl)
        state_t, state_s = state_t @ p_t, state_s @ p_s
    loss_exact = np.cumsum(loss_exact)

    result = ev.exposure_bias(student, teacher, tokenizer, [prompt] * 400, max_l=max_l, bootstrap=200, seed=0, batch_size=200)
    for name, exact in (("eps_t", eps_exact), ("loss_le", loss_exact)):
        estimate = np.array(getattr(result, name))
        low, high = (np.array(band) for band in getattr(result, f"{name}_ci"))
        # Within about four standard errors (a 95% band is about four wide); step 1
        # has no sampling error, so float32 rounding sets the floor.
        assert np.all(np.abs(estimate - exact) <= (high - low) + 1e-4), (name, estimate, exact)
    assert abs(result.ex_acc_err[-1]) > 1.0  # this pair of models does accumulate (or shed) error


def test_exposure_unknown_loss_rejected(student, teacher, tokenizer):
    with pytest.raises(ConfigError, match=r"unknown per-step loss 'kll'; use one of kl, reverse_kl, tvd"):
        ev.exposure_bias(student, teacher, tokenizer, PAIRS, max_l=2, loss="kll")


def test_exposure_reverse_kl_and_tvd(student, teacher, tokenizer):
    for loss in ("reverse_kl", "tvd"):
        result = ev.exposure_bias(student, teacher, tokenizer, PAIRS, max_l=3, bootstrap=0, loss=loss)
        assert all(v > 0 for v in result.eps_t), loss
    tvd = ev.exposure_bias(student, teacher, tokenizer, PAIRS, max_l=3, bootstrap=0, loss="tvd")
    assert all(v <= 1.0 for v in tvd.eps_t)


# --- Reports -------------------------------------------------------------------------------


def test_report_files_written(student, teacher, tokenizer, tmp_path):
    settings = {"eval.max_l": 4, "eval.bootstrap": 30, "eval.max_new_tokens": 6, "eval.max_pairs": 4}
    student.save_pretrained(tmp_path / "step-10")
    results = ev.evaluate_checkpoints(
        settings, [str(tmp_path / "step-10"), teacher], str(tmp_path / "report"),
        teacher=teacher, tokenizer=tokenizer, pairs=PAIRS,
    )
    assert list(results) == ["step-10", "model1"]
    assert results["step-10"].heldout.num_pairs == 4
    assert results["model1"].heldout.kl == 0.0

    report = tmp_path / "report"
    assert sorted(os.listdir(report)) == ["exposure_bias.csv", "exposure_bias.png", "metrics.json", "summary.csv"]
    document = json.loads((report / "metrics.json").read_text())
    assert document["checkpoints"]["step-10"]["exposure_bias"]["l"] == [1, 2, 3, 4]
    assert (report / "exposure_bias.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((report / "summary.csv").read_text().splitlines()) == 3
    assert len((report / "exposure_bias.csv").read_text().splitlines()) == 1 + 2 * 4
    umask = os.umask(0)
    os.umask(umask)
    assert (report / "summary.csv").stat().st_mode & 0o777 == 0o666 & ~umask


def test_report_json_has_no_nan(tmp_path):
    result = ev.CheckpointEvaluation(
        label="a", exposure=ev.exposure_bias_from_losses(np.zeros((2, 2)), np.array([[0.0, 1.0], [0.0, 1.0]]))
    )
    ev.write_report(result, str(tmp_path))
    text = (tmp_path / "metrics.json").read_text()
    assert "NaN" not in text
    assert "Infinity" not in text
    assert json.loads(text)["checkpoints"]["a"]["exposure_bias"]["ex_acc_err"] == [0.0, None]


def test_plot_overlays_checkpoints(tmp_path):
    rng = np.random.default_rng(0)
    curves = {
        f"step-{k}": ev.exposure_bias_from_losses(rng.random((10, 5)), rng.random((10, 5)) * k, bootstrap=20)
        for k in (1, 2, 3)
    }
    path = ev.plot_exposure_bias(curves, str(tmp_path / "plots" / "eb.png"))
    assert os.path.getsize(path) > 1000
    assert os.listdir(tmp_path / "plots") == ["eb.png"]


def test_format_table_rows():
    oracle = np.ones((3, 20))
    result = ev.CheckpointEvaluation(label="ckpt", exposure=ev.exposure_bias_from_losses(oracle, 2 * oracle, bootstrap=10))
    text = ev.format_table({"ckpt": result})
    assert "ckpt" in text
    assert "100 [100, 100]" in text  # ExAccErr(20) with its band
    lengths = [line.split()[0] for line in text.splitlines()[text.splitlines().index("") + 4 :]]
    assert lengths == ["1", "2", "4", "8", "16", "20"]


def test_checkpoints_ce_only_skips_teacher(student, tokenizer):
    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=10, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    results = ev.evaluate_checkpoints(
        {"eval.max_pairs": 2}, {"mine": student}, None, teacher=teacher, tokenizer=tokenizer, pairs=PAIRS, metrics=["ce"]
    )
    assert list(results) == ["mine"]
    assert results["mine"].heldout.num_pairs == 2
    assert results["mine"].heldout.kl is None
    assert results["mine"].rouge is None
    assert results["mine"].exposure is None


def test_unknown_metric_suggests_name(teacher, tokenizer):
    with pytest.raises(ConfigError, match=r"unknown evaluation metric 'rouge'; did you mean 'rouge_l'\?"):
        ev.evaluate_checkpoints({}, [teacher], None, teacher=teacher, tokenizer=tokenizer, pairs=PAIRS, metrics=["rouge"])


def test_missing_checkpoint_rejected(teacher, tokenizer, tmp_path):
    with pytest.raises(ConfigError, match=r"checkpoint directory .*nothing.* not found"):
        ev.evaluate_checkpoints(
            {}, [str(tmp_path / "nothing")], None, teacher=teacher, tokenizer=tokenizer, pairs=PAIRS, metrics=["ce"]
        )


def test_rouge_scoring_keeps_absl_info_off_the_terminal(student, tokenizer):
    """rouge-score logs "Using default tokenizer." at info level through absl; kdsl's commands log at info level."""
    import logging

    root = logging.getLogger()
    absl_logger = logging.getLogger("absl")
    saved = root.level, absl_logger.level
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Collect(level=logging.DEBUG)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    absl_logger.setLevel(logging.NOTSET)
    try:
        ev.rouge_l(student, tokenizer, PAIRS[:1], max_new_tokens=2)
    finally:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        absl_logger.setLevel(saved[1])
    assert not [message for message in records if "default tokenizer" in message], records
