"""Prompt/response pairs from the builtin corpus, a local file or a hub dataset.

`load_pairs` returns a `datasets.Dataset` with exactly two string columns,
`prompt` and `response`. A training sequence is `prompt + response` followed
by the tokenizer's EOS token. The builtin prompts end with the next speaker's
name and a newline, so the response starts a new line.

Name resolution, in order:

* `builtin:shakespeare`: the shipped corpus (`kdsl/builtins/shakespeare`),
  with the splits `train`, `validation` and `test` (whole plays per split).
* a local file, loaded with the `datasets` builder of its format: `.json` and
  `.jsonl` (json), `.csv`, `.parquet`, and `.txt` (text). A file is the split
  `train`. A `.txt` file contains turns separated by blank lines, and each pair of
  adjacent turns is one pair (turn 1 → turn 2, turn 2 → turn 3, ...).
* a local folder, loaded with `datasets.load_dataset(folder)`, which maps files
  named `train.*`, `validation.*` and `test.*` to those splits.
* anything else is a hub dataset id, tried only when it is not a local path.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import random
from pathlib import Path

import datasets

from kdsl import builtins
from kdsl.errors import ConfigError

BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
COLUMNS = ("prompt", "response")


def load_pairs(
    name: str,
    split: str = "train",
    *,
    prompt_field: str = "prompt",
    response_field: str = "response",
    fraction: float = 1.0,
    seed: int = 0,
) -> datasets.Dataset:
    """Load prompt/response pairs of one split; `fraction` < 1 keeps a seeded subset."""
    if not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise ConfigError(f"fraction {fraction!r} is invalid; expected a number in (0, 1], such as 0.1 for 10% of the pairs")

    if builtins.is_builtin(name):
        dataset = _load_builtin(name, split)
    elif _looks_like_path(name):
        dataset = _load_local(name, split, prompt_field, response_field)
    else:
        dataset = _load_hub(name, split, prompt_field, response_field)
    return _subset(dataset, fraction, seed)


def dataset_names() -> list[str]:
    """Return the builtin dataset names, with their `builtin:` prefix."""
    return sorted(builtins.PREFIX + name for name in builtins.DATASETS)


# ----------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------

def _load_builtin(name: str, split: str) -> datasets.Dataset:
    key = builtins.strip_prefix(name)
    if key not in builtins.DATASETS:
        raise ConfigError(f"unknown builtin dataset {name!r}; known builtin datasets: {', '.join(dataset_names())}")
    _check_split(name, split, builtins.SPLITS)

    path = builtins.DATASETS[key] / f"{split}.jsonl.gz"
    if not path.is_file():
        raise ConfigError(f"builtin dataset file {path} is missing; rebuild it with `python scripts/build_builtins.py --stages corpus`")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return datasets.Dataset.from_dict({column: [row[column] for row in rows] for column in COLUMNS})


def _load_local(name: str, split: str, prompt_field: str, response_field: str) -> datasets.Dataset:
    path = Path(name).expanduser()
    if not path.exists():
        raise ConfigError(f"dataset file {str(path)!r} not found; check the path or use a builtin dataset ({', '.join(dataset_names())})")

    if path.is_dir():
        loaded = datasets.load_dataset(str(path))
        _check_split(name, split, list(loaded))
        return _select_columns(loaded[split], name, prompt_field, response_field)

    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ConfigError(
            f"dataset file {name!r} has the unsupported suffix {path.suffix!r}; "
            f"expected one of {', '.join(sorted(BUILDERS))}"
        )
    _check_split(name, split, ["train"])
    if builder == "text":
        return _text_pairs(path)
    dataset = datasets.load_dataset(builder, data_files={"train": str(path)}, split="train")
    return _select_columns(dataset, name, prompt_field, response_field)


def _load_hub(name: str, split: str, prompt_field: str, response_field: str) -> datasets.Dataset:
    # A hub dataset id is tried only here, after every local interpretation failed.
    try:
        loaded = datasets.load_dataset(name)
    except Exception as error:  # datasets raises several unrelated types when offline or not found
        raise ConfigError(
            f"dataset {name!r} was not found locally, and loading it from the hub failed "
            f"({type(error).__name__}: {_first_line(error)}); point `data` at a local "
            ".json/.jsonl/.csv/.parquet/.txt file or use builtin:shakespeare"
        ) from None
    available = list(loaded) if isinstance(loaded, datasets.DatasetDict) else ["train"]
    _check_split(name, split, available)
    dataset = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    return _select_columns(dataset, name, prompt_field, response_field)


def _text_pairs(path: Path) -> datasets.Dataset:
    turns = datasets.load_dataset("text", data_files={"train": str(path)}, sample_by="paragraph", split="train")
    texts = [text.strip() for text in turns["text"] if text.strip()]
    if len(texts) < 2:
        raise ConfigError(
            f"text dataset {str(path)!r} has {len(texts)} turn(s); a pair needs two turns "
            "separated by a blank line"
        )
    return datasets.Dataset.from_dict({"prompt": texts[:-1], "response": texts[1:]})


# ----------------------------------------------------------------------------
# Checks and selection
# ----------------------------------------------------------------------------

def _looks_like_path(name: str) -> bool:
    """Return True when `name` is an existing path or is written like a file path."""
    if os.path.exists(os.path.expanduser(name)):
        return True
    if name.startswith((".", "/", "~")):
        return True
    if name.count("/") > 1:  # a hub id has one slash: owner/name
        return True
    return Path(name).suffix.lower() in BUILDERS or name.lower().endswith(".jsonl.gz")


def _check_split(name: str, split: str, available) -> None:
    if split not in available:
        raise ConfigError(f"dataset {name!r} has no split {split!r}; available splits: {', '.join(available)}")


def _select_columns(dataset: datasets.Dataset, name: str, prompt_field: str, response_field: str) -> datasets.Dataset:
    """Keep the prompt and response fields, renamed to `prompt` and `response`."""
    if prompt_field == response_field:
        raise ConfigError(f"prompt and response fields are both {prompt_field!r}; they must name different fields")
    for field, role in ((prompt_field, "prompt"), (response_field, "response")):
        if field not in dataset.column_names:
            raise ConfigError(
                f"dataset {name!r} has no field {field!r}; available fields: {', '.join(dataset.column_names)}; "
                f"set data.{role}_field to the field that holds the {role}"
            )
        feature = dataset.features[field]
        if getattr(feature, "dtype", None) not in ("string", "large_string"):
            raise ConfigError(f"field {field!r} of dataset {name!r} has type {feature}, expected strings")
        missing = dataset.data.column(field).null_count
        if missing:
            raise ConfigError(f"field {field!r} of dataset {name!r} is missing in {missing} row(s); every row needs a string")

    dataset = dataset.select_columns([prompt_field, response_field])
    return dataset.rename_columns({prompt_field: "prompt", response_field: "response"})


def _subset(dataset: datasets.Dataset, fraction: float, seed: int) -> datasets.Dataset:
    if fraction >= 1.0:
        return dataset
    count = max(1, math.ceil(len(dataset) * fraction))
    indices = sorted(random.Random(seed).sample(range(len(dataset)), count))
    return dataset.select(indices)


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no message"
