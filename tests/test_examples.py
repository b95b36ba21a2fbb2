"""The examples run as users run them."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hf_trainer_example_trains(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    example = load_example("hf_trainer")
    loss = example.main(["--teacher", "builtin:tiny-student", "--max-steps", "2", "--pairs", "16", "--out", str(tmp_path)])
    assert math.isfinite(loss)
    assert loss > 0
