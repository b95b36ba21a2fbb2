"""Samplers: batch layout, labels of generated responses, mixtures, adaptive SGO and replay."""

from __future__ import annotations

import math

import datasets
import pytest
import sympy
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from kdsl.errors import ConfigError
from kdsl.objective import PROGRESS, AdaptiveSource, DataSource, MixtureSource, Scalar, StudentSource
from kdsl.samplers import (
    IGNORE_INDEX,
    AdaptiveSampler,
    AdaptiveSettings,
    DataSampler,
    DrawPoint,
    Example,
    GenerationSampler,
    GenerationSettings,
    MixtureSampler,
    PairEncoder,
    PairStream,
    ReplayBuffer,
    SamplerContext,
    build_sampler,
    collate,
    cut_completion,
    generate_examples,
    left_pad,
)

CORPUS = [
    "To be, or not to be, that is the question.",
    "Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune,",
    "or to take arms against a sea of troubles and by opposing end them.",
    "All the world's a stage, and all the men and women merely players.",
    "Now is the winter of our discontent made glorious summer by this sun of York.",
    "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him.",
]


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of 300 tokens whose pad token is its EOS token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def make_model(vocab_size: int, seed: int = 0, tie: bool = True) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=128, n_embd=32, n_layer=1, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tie,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def make_pairs(count: int = 24) -> datasets.Dataset:
    prompts = [CORPUS[i % len(CORPUS)][: 12 + i % 9] for i in range(count)]
    responses = [CORPUS[(i + 1) % len(CORPUS)][: 10 + i % 13] for i in range(count)]
    return datasets.Dataset.from_dict({"prompt": prompts, "response": responses})


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


# --- Layout ----------------------------------------------------------------------------


def test_collate_labels_only_response():
    examples = [Example((5, 6, 7), (8, 9), "d_data"), Example((5,), (10, 11, 12, 13), "d_data")]
    batch = collate(examples, pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 10, 11, 12, 13]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert batch.labels.tolist() == [[-100, -100, -100, 8, 9], [-100, 10, 11, 12, 13]]
    assert batch.count_targets() == 6


def test_collate_pad_equal_to_eos_keeps_eos():
    eos = 3
    examples = [Example((5, 6), (8, eos), "d_q"), Example((5, 6), (8, 9, 10, eos), "d_q")]
    batch = collate(examples, pad_id=eos)
    assert batch.input_ids[0].tolist() == [5, 6, 8, eos, eos, eos]
    assert batch.labels[0].tolist() == [-100, -100, 8, eos, -100, -100]
    assert batch.attention_mask[0].tolist() == [1, 1, 1, 1, 0, 0]
    assert batch.labels[1].tolist() == [-100, -100, 8, 9, 10, eos]


def test_left_pad_rejects_empty_prompt():
    with pytest.raises(ValueError, match="empty prompt"):
        left_pad([(1, 2), ()], pad_id=0)


def test_cut_completion_keeps_first_eos():
    assert cut_completion([4, 5, 3, 3, 3], frozenset({3})) == (4, 5, 3)
    assert cut_completion([3, 3], frozenset({3})) == (3,)
    assert cut_completion([4, 5, 6], frozenset({3})) == (4, 5, 6)


def test_encoder_truncates_prompt_and_response(tokenizer):
    encoder = PairEncoder(tokenizer, max_prompt_tokens=4, max_response_tokens=3)
    prompt_ids = tokenizer("All the world's a stage", add_special_tokens=False)["input_ids"]
    response_ids = tokenizer("and all the men", add_special_tokens=False)["input_ids"]
    example = encoder.encode("All the world's a stage", "and all the men")
    assert example.prompt == tuple(prompt_ids[-4:])
    assert example.response == tuple(response_ids[:3])
    assert tokenizer.eos_token_id not in example.response

    short = PairEncoder(tokenizer, max_prompt_tokens=4, max_response_tokens=64).encode("a", "and")
    assert short.response[-1] == tokenizer.eos_token_id


def test_encoder_empty_prompt_becomes_bos(tokenizer):
    encoder = PairEncoder(tokenizer, max_prompt_tokens=4, max_response_tokens=8)
    assert encoder.encode("", "and").prompt == (tokenizer.bos_token_id,)


# --- Generated responses ---------------------------------------------------------------


def biased_to_stop(tokenizer) -> tuple[GPT2LMHeadModel, list[tuple[int, ...]]]:
    """A tiny model whose greedy continuations end with EOS on some prompts and not on others.

    The EOS row of the untied output head copies the row of a token that
    greedy decoding emits for some prompts only, plus a small margin, so EOS
    takes that token's place.
    """
    model = make_model(len(tokenizer), seed=3, tie=False)
    encoder = PairEncoder(tokenizer, max_prompt_tokens=16, max_response_tokens=16)
    prompts = [encoder.encode_prompt(text[:n]) for text in CORPUS for n in (9, 17)]
    greedy = GenerationSettings(max_new_tokens=10, temperature=0.0)
    eos = tokenizer.eos_token_id
    plain = generate_examples(model, prompts, pad_id=eos, eos_ids=frozenset({eos}), settings=greedy, source="d_q")
    rows_with = {}
    for index, example in enumerate(plain):
        for token in set(example.response):
            rows_with.setdefault(token, set()).add(index)
    # A token that some but not all greedy rows contain.
    candidates = [t for t, rows in rows_with.items() if 0 < len(rows) < len(prompts) and t != eos]
    stop = max(candidates, key=lambda t: len(rows_with[t]))
    with torch.no_grad():
        model.lm_head.weight[eos] = model.lm_head.weight[stop] * 1.5
    return model, prompts


def test_generated_labels_align_with_logits(tokenizer):
    model, prompts = biased_to_stop(tokenizer)
    eos = tokenizer.eos_token_id
    greedy = GenerationSettings(max_new_tokens=10, temperature=0.0)
    examples = generate_examples(model, prompts, pad_id=eos, eos_ids=frozenset({eos}), settings=greedy, source="d_q")
    batch = collate(examples, pad_id=eos)

    ended = [e for e in examples if e.response[-1] == eos]
    assert 0 < len(ended) < len(examples), "the fixture should give rows with and without EOS"
    assert len({len(e.response) for e in examples}) > 1

    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    labels = batch.labels[:, 1:]  # logits[:, p] scores labels[:, p]
    predicted = logits.argmax(-1)
    for row, example in enumerate(examples):
        prompt_length = len(example.prompt)
        valid = labels[row] != IGNORE_INDEX
        # Greedy decoding picked each response token as the argmax of the logit before it.
        assert torch.equal(predicted[row][valid], labels[row][valid])
        assert valid.sum() == len(example.response)
        # The first scored position is the last prompt token, which predicts the first response token.
        assert valid.nonzero()[0].item() == prompt_length - 1
        assert (batch.labels[row, :prompt_length] == IGNORE_INDEX).all()
    for example, row in ((e, examples.index(e)) for e in ended):
        end = len(example.prompt) + len(example.response)
        assert batch.labels[row, end - 1] == eos  # the EOS that ends the response is scored
        assert (batch.labels[row, end:] == IGNORE_INDEX).all()  # padding has the EOS id but no label
        assert (batch.input_ids[row, end:] == eos).all()


def test_sampled_generation_respects_settings(tokenizer):
    model = make_model(len(tokenizer), seed=1)
    eos = tokenizer.eos_token_id
    settings = GenerationSettings(max_new_tokens=6, temperature=1.3, top_k=20, top_p=0.9)
    prompts = [(5, 6, 7), (8,), (9, 10)]
    torch.manual_seed(0)
    first = generate_examples(model, prompts, pad_id=eos, eos_ids=frozenset({eos}), settings=settings, source="d_q")
    torch.manual_seed(0)
    second = generate_examples(model, prompts, pad_id=eos, eos_ids=frozenset({eos}), settings=settings, source="d_q")
    assert first == second
    assert [e.prompt for e in first] == prompts
    assert all(1 <= len(e.response) <= 6 for e in first)
    assert model.training is False


def test_generation_sampler_restores_train_mode(tokenizer):
    model = make_model(len(tokenizer)).train()
    encoder = PairEncoder(tokenizer, 8, 8)
    stream = PairStream(make_pairs(), encoder, seed=0, stream_id=0)
    sampler = GenerationSampler(stream, lambda: model, GenerationSettings(max_new_tokens=4), "d_q")
    batch = sampler.draw(3, DrawPoint())
    assert model.training
    assert batch.source == "d_q"
    assert len(batch) == 3
    assert (batch.labels[:, 1:] != IGNORE_INDEX).sum(1).min() >= 1


# --- Pair streams ----------------------------------------------------------------------


def test_stream_visits_each_pair_once_per_epoch(tokenizer):
    pairs = make_pairs(10)
    stream = PairStream(pairs, PairEncoder(tokenizer, 8, 8), seed=4, stream_id=0)
    seen = stream.next_indices(5) + stream.next_indices(5)
    assert sorted(seen) == list(range(10))
    assert stream.epoch == 0
    stream.next_indices(1)
    assert stream.epoch == 1


def test_stream_ranks_take_disjoint_slices(tokenizer):
    pairs = make_pairs(12)
    encoder = PairEncoder(tokenizer, 8, 8)
    ranks = [PairStream(pairs, encoder, seed=4, stream_id=2, rank=r, world_size=2) for r in range(2)]
    draws = [stream.next_indices(3) for stream in ranks]
    assert not set(draws[0]) & set(draws[1])
    assert ranks[0].state_dict() == ranks[1].state_dict()


def test_stream_resumes_from_state(tokenizer):
    pairs = make_pairs(7)
    encoder = PairEncoder(tokenizer, 8, 8)
    stream = PairStream(pairs, encoder, seed=1, stream_id=0)
    stream.next_indices(5)
    stream.next_indices(5)
    state = stream.state_dict()
    expected = stream.next_indices(6)
    resumed = PairStream(pairs, encoder, seed=1, stream_id=0)
    resumed.load_state_dict(state)
    assert resumed.next_indices(6) == expected


def test_stream_rejects_empty_data(tokenizer):
    empty = datasets.Dataset.from_dict({"prompt": [], "response": []})
    with pytest.raises(ConfigError, match="no pairs"):
        PairStream(empty, PairEncoder(tokenizer, 8, 8), seed=0, stream_id=0)


# --- Mixtures --------------------------------------------------------------------------


def two_sources(tokenizer, coefficients, per="batch", rank=0, world_size=2):
    pairs = make_pairs()
    encoder = PairEncoder(tokenizer, 8, 8)
    streams = [PairStream(pairs, encoder, seed=0, stream_id=i, rank=rank, world_size=world_size) for i in range(2)]
    components = [(coefficients[0], DataSampler(streams[0], "a")), (coefficients[1], DataSampler(streams[1], "b"))]
    return MixtureSampler(components, per=per, path=(0,))


def test_mixture_per_batch_follows_probability(tokenizer):
    mixture = two_sources(tokenizer, (Scalar(sympy.Rational(3, 10)), Scalar(sympy.Rational(7, 10))))
    draws = 800
    picks = [mixture.draw_examples(1, DrawPoint(step=s, seed=11))[0].source for s in range(draws)]
    count = picks.count("a")
    sigma = math.sqrt(draws * 0.3 * 0.7)
    assert abs(count - 0.3 * draws) < 4 * sigma


def test_mixture_coin_flips_agree_across_ranks(tokenizer):
    coefficients = (Scalar(sympy.Rational(1, 2)), Scalar(sympy.Rational(1, 2)))
    rank0 = two_sources(tokenizer, coefficients, rank=0)
    rank1 = two_sources(tokenizer, coefficients, rank=1)
    for step in range(40):
        point = DrawPoint(step=step, seed=3, micro=step % 2)
        assert rank0.draw(2, point).source == rank1.draw(2, point).source


def test_mixture_follows_schedule(tokenizer):
    mixture = two_sources(tokenizer, (Scalar(PROGRESS), Scalar(1 - PROGRESS)))
    start = [mixture.draw_examples(1, DrawPoint(step=s, progress=0.0))[0].source for s in range(50)]
    end = [mixture.draw_examples(1, DrawPoint(step=s, progress=1.0))[0].source for s in range(50)]
    middle = [mixture.draw_examples(1, DrawPoint(step=s, progress=0.5))[0].source for s in range(400)]
    assert set(start) == {"b"}
    assert set(end) == {"a"}
    assert abs(middle.count("a") - 200) < 4 * math.sqrt(400 * 0.25)
    assert mixture.schedule_values(DrawPoint(progress=0.25)) == {"mix0/a": 0.25, "mix0/b": 0.75}


def test_mixture_per_sequence_mixes_rows(tokenizer):
    mixture = two_sources(tokenizer, (Scalar(sympy.Rational(1, 4)), Scalar(sympy.Rational(3, 4))), per="sequence")
    rows = []
    for step in range(50):
        batch = mixture.draw(8, DrawPoint(step=step))
        rows.extend(batch.sequence_sources)
    assert abs(rows.count("a") - 100) < 4 * math.sqrt(400 * 0.25 * 0.75)
    assert "+" in mixture.draw(8, DrawPoint(step=1)).source


def test_mixture_rejects_probability_outside_unit_interval(tokenizer):
    mixture = two_sources(tokenizer, (Scalar(2 * PROGRESS), Scalar(1 - 2 * PROGRESS)))
    with pytest.raises(ConfigError, match=r"is 1\.6.*expected a probability"):
        mixture.draw(1, DrawPoint(progress=0.8))


def test_build_sampler_reads_mixture_setting(tokenizer):
    half = Scalar(sympy.Rational(1, 2))
    source = MixtureSource(((half, DataSource()), (half, StudentSource())))
    context = SamplerContext(
        pairs=make_pairs(), encoder=PairEncoder(tokenizer, 8, 8), student=lambda: None,
        teacher=lambda: None, settings={"mixture.per": "sequence"},
    )
    sampler = build_sampler(source, context)
    assert isinstance(sampler, MixtureSampler)
    assert sampler.per == "sequence"
    assert [c.name for c in sampler.components] == ["d_data", "d_q"]


# --- Adaptive SGO and replay -----------------------------------------------------------


def adaptive_sampler(tokenizer, model, **params):
    source = AdaptiveSource(StudentSource(), DataSource(), tuple(params.items()))
    context = SamplerContext(
        pairs=make_pairs(), encoder=PairEncoder(tokenizer, 8, 8), student=lambda: model,
        teacher=lambda: None, settings={"sgo.max_new_tokens": 4},
    )
    sampler = build_sampler(source, context)
    assert isinstance(sampler, AdaptiveSampler)
    return sampler


def test_adaptive_probability_rises_with_validation_loss(tokenizer):
    sampler = adaptive_sampler(tokenizer, None, init_prob=0.0, step=0.2, max_prob=0.5, threshold=0.05)
    losses = [3.0, 2.9, 2.93, 3.0, 3.01, 3.2, 3.5, 4.0]
    probabilities = []
    for loss in losses:
        sampler.observe_validation_loss(loss, DrawPoint())
        probabilities.append(round(sampler.probability, 6))
    # Reference 3.0; 3.0 rises by < 0.05; 3.2 is a rise (new reference); 3.5 and 4.0 rise again; cap 0.5.
    assert probabilities == [0.0, 0.0, 0.0, 0.0, 0.0, 0.2, 0.4, 0.5]
    assert sampler.reference_loss == 4.0


def test_adaptive_draws_data_at_zero_probability(tokenizer):
    sampler = adaptive_sampler(tokenizer, None, init_prob=0.0)
    assert {sampler.draw(2, DrawPoint(step=s)).source for s in range(10)} == {"d_data"}


def test_adaptive_fills_buffer_then_replays(tokenizer):
    model = make_model(len(tokenizer))
    sampler = adaptive_sampler(tokenizer, model, init_prob=1.0, max_prob=1.0, replay_capacity=6,
                               fresh_schedule="constant", replay_ratio=0.5)
    sources = [sampler.draw(2, DrawPoint(step=s, progress=0.5)).source for s in range(16)]
    assert sources[:3] == ["d_q"] * 3  # fresh until the buffer is full
    assert len(sampler.buffer) == 6
    assert set(sources) == {"d_q", "replay"}
    fresh = sources[3:].count("d_q")
    assert 1 <= fresh <= 12


def test_adaptive_rejects_unknown_parameter(tokenizer):
    with pytest.raises(ConfigError, match="no parameter 'speed'"):
        adaptive_sampler(tokenizer, None, speed=2)


def test_adaptive_settings_fresh_share():
    decreasing = AdaptiveSettings(fresh_schedule="decreasing")
    assert decreasing.fresh_share(0.0) == 1.0
    assert decreasing.fresh_share(0.75) == 0.25
    assert AdaptiveSettings(fresh_schedule="constant", replay_ratio=0.3).fresh_share(0.9) == pytest.approx(0.7)
    assert AdaptiveSettings(fresh_schedule="increasing").fresh_share(0.2) == 0.2


def test_replay_buffer_evicts_oldest_first():
    buffer = ReplayBuffer(capacity=3)
    buffer.add([Example((1,), (i,), "d_q") for i in range(5)])
    assert [e.response for e in buffer.items] == [(2,), (3,), (4,)]
    sample = buffer.sample(3, torch.Generator().manual_seed(0))
    assert sorted(e.response for e in sample) == [(2,), (3,), (4,)]
    assert {e.source for e in sample} == {"replay"}


def test_adaptive_state_round_trip(tokenizer):
    model = make_model(len(tokenizer))
    sampler = adaptive_sampler(tokenizer, model, init_prob=1.0, max_prob=1.0, replay_capacity=4)
    for step in range(3):
        sampler.draw(2, DrawPoint(step=step))
    sampler.observe_validation_loss(2.5, DrawPoint())
    state = sampler.state_dict()
    restored = adaptive_sampler(tokenizer, model, init_prob=1.0, max_prob=1.0, replay_capacity=4)
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    assert list(restored.buffer.items) == list(sampler.buffer.items)


def test_encoder_applies_chat_template(tokenizer):
    chat = make_tokenizer()
    chat.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    encoder = PairEncoder(chat, max_prompt_tokens=64, max_response_tokens=8, chat_template=True)
    expected = chat("[user] All the world\n[assistant] ", add_special_tokens=False)["input_ids"]
    assert encoder.encode_prompt("All the world") == tuple(expected)


def test_encoder_rejects_missing_chat_template(tokenizer):
    encoder = PairEncoder(tokenizer, max_prompt_tokens=8, max_response_tokens=8, chat_template=True)
    with pytest.raises(ConfigError, match="has no chat template: set data.chat_template = false"):
        encoder.encode_prompt("hello")
