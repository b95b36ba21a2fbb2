"""Files shipped with kdsl: the Shakespeare corpus, two tokenizers, a teacher and two students.

`scripts/build_builtins.py` writes everything under this folder; `kdsl.data` and
`kdsl.models` resolve `builtin:` names to these paths.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent
PREFIX = "builtin:"

DATASETS: dict[str, Path] = {"shakespeare": ROOT / "shakespeare"}
MODELS: dict[str, Path] = {
    "tiny-teacher": ROOT / "models" / "tiny-teacher",
    "tiny-student": ROOT / "models" / "tiny-student",
    "tiny-student-unigram": ROOT / "models" / "tiny-student-unigram",
    "tiny-ref": ROOT / "models" / "tiny-ref",
}
TOKENIZERS: dict[str, Path] = {
    "bpe-4096": ROOT / "tokenizers" / "bpe-4096",
    "unigram-3000": ROOT / "tokenizers" / "unigram-3000",
}
SPLITS = ("train", "validation", "test")


def is_builtin(name: str) -> bool:
    return name.startswith(PREFIX)


def strip_prefix(name: str) -> str:
    return name[len(PREFIX):]
