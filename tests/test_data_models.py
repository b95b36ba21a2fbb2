"""Loaders of pairs, tokenizers and models: builtin names, local files and offline errors."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import datasets
import huggingface_hub.constants
import pandas as pd
import pytest
import torch

from kdsl.data import dataset_names, load_pairs
from kdsl.errors import ConfigError
from kdsl.models import builtin_names, load_model, load_tokenizer

ROWS = [
    {"question": "Who's there?", "answer": "Nay, answer me: stand, and unfold yourself."},
    {"question": "Long live the king!", "answer": "Bernardo?"},
    {"question": "He.", "answer": "You come most carefully upon your hour."},
]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Keep every hub access offline, whichever module imported `datasets` first."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """Send the `datasets` cache of local files into tmp_path."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    return tmp_path


# ----------------------------------------------------------------------------
# Pairs
# ----------------------------------------------------------------------------

def test_builtin_pairs_columns_and_size():
    train = load_pairs("builtin:shakespeare")
    validation = load_pairs("builtin:shakespeare", "validation")
    assert train.column_names == ["prompt", "response"]
    assert 20_000 <= len(train) <= 27_000
    assert 2_000 <= len(validation) <= 5_000
    assert all(isinstance(text, str) and text for text in validation["response"][:200])


def test_builtin_prompt_ends_with_next_speaker():
    pair = load_pairs("builtin:shakespeare", "test")[0]
    last_line = pair["prompt"].rstrip("\n").split("\n")[-1]
    assert pair["prompt"].endswith(":\n")
    assert last_line.endswith(":")
    assert last_line[:-1].upper() == last_line[:-1]
    assert not pair["response"].startswith(("\n", " "))


def test_fraction_is_seeded_subset():
    full = load_pairs("builtin:shakespeare", "validation")
    first = load_pairs("builtin:shakespeare", "validation", fraction=0.1, seed=3)
    again = load_pairs("builtin:shakespeare", "validation", fraction=0.1, seed=3)
    other = load_pairs("builtin:shakespeare", "validation", fraction=0.1, seed=4)
    assert len(first) == -(-len(full) * 1 // 10)
    assert first["response"] == again["response"]
    assert first["response"] != other["response"]
    assert set(first["prompt"]) <= set(full["prompt"])


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5, "half"])
def test_fraction_out_of_range_rejected(fraction):
    with pytest.raises(ConfigError, match="fraction"):
        load_pairs("builtin:shakespeare", fraction=fraction)


def test_jsonl_with_custom_fields(cache):
    path = cache / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    pairs = load_pairs(str(path), prompt_field="question", response_field="answer")
    assert pairs.column_names == ["prompt", "response"]
    assert pairs["prompt"] == [row["question"] for row in ROWS]
    assert pairs["response"] == [row["answer"] for row in ROWS]


def test_json_array_file(cache):
    path = cache / "pairs.json"
    path.write_text(json.dumps([{"prompt": r["question"], "response": r["answer"], "id": i} for i, r in enumerate(ROWS)]))
    pairs = load_pairs(str(path))
    assert pairs.column_names == ["prompt", "response"]
    assert len(pairs) == 3


def test_csv_file(cache):
    path = cache / "pairs.csv"
    pd.DataFrame({"prompt": [r["question"] for r in ROWS], "response": [r["answer"] for r in ROWS]}).to_csv(path, index=False)
    pairs = load_pairs(str(path))
    assert pairs["response"][0] == ROWS[0]["answer"]


def test_parquet_file(cache):
    path = cache / "pairs.parquet"
    pd.DataFrame({"p": [r["question"] for r in ROWS], "r": [r["answer"] for r in ROWS]}).to_parquet(path)
    pairs = load_pairs(str(path), prompt_field="p", response_field="r")
    assert pairs["prompt"] == [r["question"] for r in ROWS]


def test_txt_pairs_adjacent_turns(cache):
    path = cache / "dialogue.txt"
    path.write_text("First turn,\ntwo lines.\n\nSecond turn.\n\n\nThird turn.\n")
    pairs = load_pairs(str(path))
    assert pairs["prompt"] == ["First turn,\ntwo lines.", "Second turn."]
    assert pairs["response"] == ["Second turn.", "Third turn."]


def test_txt_single_turn_rejected(cache):
    path = cache / "one.txt"
    path.write_text("Only one turn.\n")
    with pytest.raises(ConfigError, match="two turns"):
        load_pairs(str(path))


def test_folder_with_named_splits(cache):
    folder = cache / "corpus"
    folder.mkdir()
    for split in ("train", "validation"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"prompt": split, "response": "x"}) + "\n" for _ in range(2)))
    assert load_pairs(str(folder), "validation")["prompt"] == ["validation", "validation"]
    with pytest.raises(ConfigError, match="available splits: train, validation"):
        load_pairs(str(folder), "test")


def test_unknown_builtin_dataset_lists_known():
    with pytest.raises(ConfigError, match="builtin:shakespeare") as caught:
        load_pairs("builtin:shakespear")
    assert "unknown builtin dataset 'builtin:shakespear'" in str(caught.value)
    assert dataset_names() == ["builtin:shakespeare"]


def test_missing_split_lists_available():
    with pytest.raises(ConfigError, match="no split 'dev'; available splits: train, validation, test"):
        load_pairs("builtin:shakespeare", "dev")


def test_local_file_has_only_train_split(cache):
    path = cache / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    with pytest.raises(ConfigError, match="available splits: train"):
        load_pairs(str(path), "validation")


def test_missing_file_error(tmp_path):
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(ConfigError, match="not found") as caught:
        load_pairs(str(missing))
    assert str(missing) in str(caught.value)


def test_missing_field_lists_fields(cache):
    path = cache / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    with pytest.raises(ConfigError, match="no field 'prompt'; available fields: question, answer"):
        load_pairs(str(path))


def test_non_string_field_rejected(cache):
    path = cache / "numbers.csv"
    path.write_text("prompt,response\n1,2\n3,4\n")
    with pytest.raises(ConfigError, match="expected strings"):
        load_pairs(str(path))


def test_unsupported_suffix_rejected(cache):
    path = cache / "pairs.xml"
    path.write_text("<pairs/>")
    with pytest.raises(ConfigError, match="unsupported suffix '.xml'"):
        load_pairs(str(path))


def test_hub_dataset_offline_error():
    with pytest.raises(ConfigError, match="was not found locally") as caught:
        load_pairs("nobody-here/no-such-dataset")
    assert "local" in str(caught.value)
    assert ".jsonl" in str(caught.value)


# ----------------------------------------------------------------------------
# Tokenizers and models
# ----------------------------------------------------------------------------

def test_builtin_names():
    assert builtin_names() == [
        "builtin:tiny-ref", "builtin:tiny-student", "builtin:tiny-student-unigram", "builtin:tiny-teacher",
    ]


@pytest.mark.parametrize(
    "name, layers, width, vocab",
    [("builtin:tiny-teacher", 4, 256, 4096), ("builtin:tiny-student", 2, 128, 4096), ("builtin:tiny-student-unigram", 2, 128, 3000),
     ("builtin:tiny-ref", 2, 128, 4096)],
)
def test_builtin_model_shapes(name, layers, width, vocab):
    model = load_model(name)
    tokenizer = load_tokenizer(name)
    assert model.config.n_layer == layers
    assert model.config.n_embd == width
    assert model.config.vocab_size == len(tokenizer) == vocab
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    assert next(model.parameters()).dtype == torch.float32


def test_builtin_tokenizer_names_load():
    assert len(load_tokenizer("builtin:bpe-4096")) == 4096
    assert len(load_tokenizer("builtin:unigram-3000")) == 3000


def test_model_dtype_option():
    model = load_model("builtin:tiny-student", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="dtype 'fp8' is invalid"):
        load_model("builtin:tiny-student", dtype="fp8")


def test_local_model_folder(tmp_path):
    model = load_model("builtin:tiny-student")
    tokenizer = load_tokenizer("builtin:tiny-student")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    again = load_model(str(tmp_path))
    assert torch.equal(again.transformer.wte.weight, model.transformer.wte.weight)
    assert load_tokenizer(str(tmp_path))("Who's there?")["input_ids"] == tokenizer("Who's there?")["input_ids"]


def test_unknown_builtin_model_lists_known():
    with pytest.raises(ConfigError, match="known builtin models: builtin:tiny-ref, builtin:tiny-student, builtin:tiny-student-unigram, builtin:tiny-teacher"):
        load_model("builtin:tiny-tutor")
    with pytest.raises(ConfigError, match="unknown builtin tokenizer 'builtin:tiny-tutor'"):
        load_tokenizer("builtin:tiny-tutor")


def test_missing_model_folder(tmp_path):
    with pytest.raises(ConfigError, match="model folder .* not found"):
        load_model(str(tmp_path / "missing"))


def test_model_path_to_file_rejected(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0")
    with pytest.raises(ConfigError, match="is a file"):
        load_model(str(path))


def test_hub_model_offline_error():
    with pytest.raises(ConfigError, match="was not found locally and the hub is offline") as caught:
        load_model("nobody-here/no-such-model")
    assert "local folder" in str(caught.value)
    with pytest.raises(ConfigError, match="tokenizer 'nobody-here/no-such-model' was not found locally"):
        load_tokenizer("nobody-here/no-such-model")
