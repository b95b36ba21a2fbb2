"""The shipped corpus, tokenizers and teacher: splits, round-trips and held-out quality."""

from __future__ import annotations

import gzip
import json
import os
import random

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
import torch.nn.functional as F

from kdsl import builtins
from kdsl.data import load_pairs
from kdsl.models import load_model, load_tokenizer

CORPUS = builtins.DATASETS["shakespeare"]

# Response cross-entropy (nats per token, EOS included, 64-token prompts and
# responses) of the shipped teacher on the first 64 validation pairs, measured
# when the weights were built and rounded up; see docs/builtins.md.
TEACHER_SAMPLE_CE = 4.49
TEACHER_SAMPLE_PAIRS = 64


def read_pairs(split: str) -> list[dict]:
    with gzip.open(CORPUS / f"{split}.jsonl.gz", "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def read_text(split: str) -> str:
    with gzip.open(CORPUS / f"{split}.txt.gz", "rt", encoding="utf-8") as handle:
        return handle.read()


def text_samples(split: str, count: int = 40, length: int = 400) -> list[str]:
    text = read_text(split)
    rng = random.Random(0)
    starts = [rng.randrange(len(text) - length) for _ in range(count)]
    return [text[start : start + length] for start in starts]


# ----------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------

def test_splits_disjoint_by_play():
    plays = {split: {pair["play"] for pair in read_pairs(split)} for split in builtins.SPLITS}
    assert not plays["train"] & plays["validation"]
    assert not plays["train"] & plays["test"]
    assert not plays["validation"] & plays["test"]
    assert len(plays["train"]) + len(plays["validation"]) + len(plays["test"]) == 37


def test_split_manifest_matches_files():
    manifest = json.loads((CORPUS / "splits.json").read_text())
    for split in builtins.SPLITS:
        plays = sorted({pair["play"] for pair in read_pairs(split)})
        assert manifest["splits"][split]["plays"] == plays
        assert manifest["splits"][split]["pairs"] == len(read_pairs(split))


@pytest.mark.parametrize("split, low, high", [("train", 20_000, 27_000), ("validation", 2_000, 5_000), ("test", 2_000, 5_000)])
def test_pair_counts_plausible(split, low, high):
    assert low <= len(read_pairs(split)) <= high


def test_pairs_are_clean_speeches():
    pairs = read_pairs("validation")
    for pair in pairs:
        assert pair["response"].strip() == pair["response"]
        assert pair["response"]
        assert "\r" not in pair["prompt"] + pair["response"]
    assert sum("[" in pair["response"] for pair in pairs) == 0
    assert sum("Gutenberg" in pair["prompt"] + pair["response"] for pair in pairs) == 0


def test_pairs_follow_running_text():
    text = read_text("test")
    for pair in read_pairs("test")[:50]:
        assert pair["prompt"] + pair["response"] + "\n" in text


# ----------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------

EDGE_CASES = [
    "HAMLET:\nTo be, or not to be: that is the question:\n",
    "  leading spaces, and  double  spaces  ",
    "O! what a noble mind is here o'erthrown!--\n\n\nThree newlines.",
    "[Exit.] (aside) \"quoted\"; semi; colon: dash--dash -- end.",
]


@pytest.mark.parametrize("name", ["builtin:bpe-4096", "builtin:unigram-3000"])
def test_tokenizer_round_trips_corpus(name):
    tokenizer = load_tokenizer(name)
    for split in ("validation", "test"):
        for sample in text_samples(split):
            ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
            assert tokenizer.decode(ids) == sample
    for sample in EDGE_CASES:
        ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == sample


def test_bpe_round_trips_any_unicode():
    tokenizer = load_tokenizer("builtin:bpe-4096")
    for sample in ["naïve café — “quotes” 你好 🎭", "\u00a0non-breaking\u2028separator", "tabs\tand\r\nCRLF"]:
        ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == sample


def test_unigram_unknown_character_is_unk():
    tokenizer = load_tokenizer("builtin:unigram-3000")
    ids = tokenizer("tab\there", add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id in ids
    assert tokenizer.decode(ids) != "tab\there"


@pytest.mark.parametrize("name", ["builtin:bpe-4096", "builtin:unigram-3000"])
def test_tokenizer_special_tokens(name):
    tokenizer = load_tokenizer(name)
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert tokenizer("HAMLET:\n")["input_ids"][-1] != tokenizer.eos_token_id
    assert tokenizer.decode([tokenizer.eos_token_id], skip_special_tokens=True) == ""


def test_generated_text_round_trips():
    tokenizer = load_tokenizer("builtin:tiny-teacher")
    model = load_model("builtin:tiny-teacher")
    prompt_ids = tokenizer(load_pairs("builtin:shakespeare", "test")[0]["prompt"])["input_ids"][-64:]
    prompt = {"input_ids": torch.tensor([prompt_ids]), "attention_mask": torch.ones(1, len(prompt_ids), dtype=torch.long)}
    torch.manual_seed(0)
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=40, do_sample=True, top_k=0, pad_token_id=tokenizer.pad_token_id)
    generated = output[0, prompt["input_ids"].shape[1] :].tolist()
    text = tokenizer.decode(generated, skip_special_tokens=True)
    again = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(again) == text


# ----------------------------------------------------------------------------
# Teacher
# ----------------------------------------------------------------------------

def response_cross_entropy(model, tokenizer, pairs, max_tokens: int = 64) -> float:
    """Mean cross-entropy per response token (EOS included), the last `max_tokens` prompt tokens as context."""
    rows, label_rows = [], []
    for pair in pairs:
        prompt = tokenizer(pair["prompt"], add_special_tokens=False)["input_ids"][-max_tokens:]
        response = tokenizer(pair["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        response = response[:max_tokens]
        rows.append(prompt + response)
        label_rows.append([-100] * len(prompt) + response)

    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, label) in enumerate(zip(rows, label_rows)):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(row)] = torch.tensor(label)
        mask[i, : len(row)] = 1

    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (B, T-1, V)
    targets = labels[:, 1:]
    total = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="sum")
    return total.item() / int((targets != -100).sum())


def test_teacher_held_out_ce_below_recorded():
    tokenizer = load_tokenizer("builtin:tiny-teacher")
    pairs = read_pairs("validation")[:TEACHER_SAMPLE_PAIRS]
    teacher_ce = response_cross_entropy(load_model("builtin:tiny-teacher").eval(), tokenizer, pairs)
    assert teacher_ce < TEACHER_SAMPLE_CE


def test_student_starts_near_uniform():
    tokenizer = load_tokenizer("builtin:tiny-student")
    pairs = read_pairs("validation")[:8]
    student_ce = response_cross_entropy(load_model("builtin:tiny-student").eval(), tokenizer, pairs)
    assert abs(student_ce - torch.log(torch.tensor(4096.0)).item()) < 0.5
