"""Tokenizers and causal language models from `builtin:` names, local folders or hub ids.

Builtin models (`kdsl/builtins/models`):

* `builtin:tiny-teacher`: GPT-2, 4 layers, width 256, byte-level BPE with 4096 tokens.
* `builtin:tiny-student`: GPT-2, 2 layers, width 128, the same tokenizer, initial weights.
* `builtin:tiny-student-unigram`: the same shape with a Unigram tokenizer of 3000 tokens.

The tokenizers `builtin:bpe-4096` and `builtin:unigram-3000` load on their own
with `load_tokenizer`. Every other name goes to transformers' `from_pretrained`:
a local folder first, a hub id only when no such path exists.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from kdsl import builtins
from kdsl.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def builtin_names() -> list[str]:
    """Return the builtin model names, with their `builtin:` prefix."""
    return sorted(builtins.PREFIX + name for name in builtins.MODELS)


def builtin_tokenizer_names() -> list[str]:
    """Return the names `load_tokenizer` accepts besides the model names."""
    return sorted(builtins.PREFIX + name for name in builtins.TOKENIZERS)


def load_tokenizer(name: str, *, trust_remote_code: bool = False):
    """Load the tokenizer of a builtin model, a builtin tokenizer, a local folder or a hub model."""
    if builtins.is_builtin(name):
        key = builtins.strip_prefix(name)
        folder = builtins.MODELS.get(key) or builtins.TOKENIZERS.get(key)
        if folder is None:
            known = ", ".join(builtin_names() + builtin_tokenizer_names())
            raise ConfigError(f"unknown builtin tokenizer {name!r}; known builtin names: {known}")
        return AutoTokenizer.from_pretrained(_existing(folder, name))

    source = _resolve(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise _not_found(name, "tokenizer", error) from None
    # A model folder saved without its tokenizer files loads as an empty tokenizer instead of failing.
    if len(tokenizer) <= 1:
        raise ConfigError(f"no tokenizer found for {name!r}: the folder has no tokenizer files; "
                          "save the tokenizer next to the model (tokenizer.save_pretrained(folder))")
    return tokenizer


def load_model(name: str, *, dtype=None, trust_remote_code: bool = False) -> PreTrainedModel:
    """Load a causal language model from a builtin name, a local folder or a hub id.

    `dtype` is None (the dtype stored in the checkpoint's config, else float32), a
    `torch.dtype`, or one of "float32", "bfloat16", "float16", "auto".
    """
    torch_dtype = _parse_dtype(dtype)
    source = _model_source(name)
    kwargs = {"trust_remote_code": trust_remote_code}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    try:
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as error:
        raise _not_found(name, "model", error) from None


def local_config(name: str, *, trust_remote_code: bool = False):
    """Return the config of a builtin model or a local model folder, or None where only a hub has it.

    Reads config.json only: no weights are loaded and no hub is contacted.
    """
    from transformers import AutoConfig

    source = _model_source(name)
    if not Path(source).is_dir():
        return None  # a hub id
    try:
        return AutoConfig.from_pretrained(source, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------

def _model_source(name: str) -> str:
    """Return the folder of a builtin model or a local model, or `name` itself as a hub id."""
    if builtins.is_builtin(name):
        key = builtins.strip_prefix(name)
        if key not in builtins.MODELS:
            raise ConfigError(f"unknown builtin model {name!r}; known builtin models: {', '.join(builtin_names())}")
        return _existing(builtins.MODELS[key], name)
    return _resolve(name)


def _parse_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return "auto"
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ConfigError(f"dtype {dtype!r} is invalid; expected a torch.dtype or one of {', '.join(list(DTYPES) + ['auto'])}")


def _existing(folder: Path, name: str) -> str:
    if not (folder / "config.json").is_file() and not (folder / "tokenizer.json").is_file():
        raise ConfigError(
            f"builtin {name!r} is missing its files under {folder}; rebuild them with "
            "`python scripts/build_builtins.py`"
        )
    return str(folder)


def _resolve(name: str) -> str:
    """Return a local folder for `name` if it is one; otherwise `name` as a hub id."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"model path {name!r} is a file; expected a folder with config.json (a save_pretrained folder)")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ConfigError(f"model folder {name!r} not found; check the path, or use a builtin model ({', '.join(builtin_names())})")
    return name


def _not_found(name: str, what: str, error: OSError) -> ConfigError:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
    reason = "the hub is offline (HF_HUB_OFFLINE is set)" if offline else "loading it from the hub failed"
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ConfigError(
        f"{what} {name!r} was not found locally and {reason}: {first_line}; "
        f"pass a local folder written by save_pretrained, or a builtin model ({', '.join(builtin_names())})"
    )
