"""The exposure-bias study script on tiny models: table, figures, timings and reuse of finished recipes."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from tests.test_samplers import make_model, make_pairs, make_tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import exposure_bias_study as study  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> Path:
    """A tiny teacher, student and reference saved to disk, and 40 pairs in a jsonl file."""
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = make_tokenizer()
    for name, seed in (("teacher", 3), ("student", 1), ("ref", 4)):
        make_model(len(tokenizer), seed=seed).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    with open(root / "pairs.jsonl", "w", encoding="utf-8") as file:
        for row in make_pairs(40):
            file.write(json.dumps(row) + "\n")
    return root


def study_args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--out", str(out), "--recipes", "kd,dimp", "--steps", "2", "--batch-size", "4", "--train-fraction", "1",
        "--eval-every", "1", "--eval-pairs", "4", "--max-l", "4", "--bootstrap", "20",
        "--teacher", str(root / "teacher"), "--student", str(root / "student"), "--ref", str(root / "ref"),
        "--data", str(root / "pairs.jsonl"),
        "--set", "data.max_prompt_tokens=12", "--set", "data.max_response_tokens=12",
        "--set", "sgo.max_new_tokens=6", "--set", "eval.max_new_tokens=4", *extra,
    ]


def test_tiny_study_writes_table_and_figures(tiny_files, tmp_path):
    out, docs = tmp_path / "study", tmp_path / "docs"
    assert study.main(study_args(tiny_files, out, "--docs", str(docs))) == 0

    table = (out / "study.md").read_text(encoding="utf-8")
    lines = table.splitlines()
    assert lines[0].startswith("| recipe | held-out CE | KL(o‖q)/tok | ROUGE-L | ExAccErr(4) %")
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| initial", "| kd", "| dimp"]

    document = json.loads((out / "study.json").read_text(encoding="utf-8"))
    rows = {row["recipe"]: row for row in document["rows"]}
    for recipe in ("kd", "dimp"):
        row = rows[recipe]
        assert row["steps"] == 2
        assert row["ce_ci"][0] <= row["ce"] <= row["ce_ci"][1]
        assert row["kl_ci"][0] <= row["kl"] <= row["kl_ci"][1]
        assert row["ex_acc_err_4_ci"][0] <= row["ex_acc_err_4"] <= row["ex_acc_err_4_ci"][1]
        assert math.isfinite(row["rouge_l"])
        assert row["train_seconds"] >= row["sample_seconds"] >= 0
        assert [step for step, _ in document["validation_ce"][recipe]] == [0, 1, 2]
    assert rows["dimp"]["sample_seconds"] > 0  # teacher generation for d_o
    assert "ex_acc_err_4" not in rows["initial"]  # the initial student gets CE and KL only

    for name in ("exposure_bias.png", "validation_ce.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
    for name in ("study_exposure_bias.png", "study_validation_ce.png"):
        assert (docs / name).read_bytes().startswith(PNG_MAGIC)
    assert (out / "eval" / "summary.csv").read_text().count("\n") == 4  # header, initial, kd, dimp
    assert (out / "dimp" / "spec.kd").read_text().startswith("# DIMP-weighted distillation")


def test_finished_recipe_is_not_trained_again(tiny_files, tmp_path):
    out = tmp_path / "study"
    args = study_args(tiny_files, out, "--recipes", "kd")
    assert study.main(args) == 0
    metrics = (out / "kd" / "metrics.jsonl").read_bytes()
    weights = (out / "kd" / "student" / "model.safetensors").read_bytes()

    assert study.main(args) == 0
    assert (out / "kd" / "metrics.jsonl").read_bytes() == metrics
    assert (out / "kd" / "student" / "model.safetensors").read_bytes() == weights
    rows = json.loads((out / "study.json").read_text())["rows"]
    assert [row["recipe"] for row in rows] == ["initial", "kd"]


def test_changed_settings_train_again(tiny_files, tmp_path):
    out = tmp_path / "study"
    assert study.main(study_args(tiny_files, out, "--recipes", "kd", "--train-only")) == 0
    assert study.main(study_args(tiny_files, out, "--recipes", "kd", "--train-only", "--steps", "3")) == 0
    run = json.loads((out / "kd" / "study_run.json").read_text())
    assert run["steps"] == 3
    assert not (out / "study.json").exists()  # --train-only writes no report


def test_unknown_recipe_is_rejected(capsys):
    with pytest.raises(SystemExit):
        study.parse_args(["--recipes", "kd,sgo"])
    assert "unknown recipe(s) ['sgo']" in capsys.readouterr().err


def test_every_recipe_spec_checks():
    for name in study.RECIPES:
        objective = study.load_recipe(name, {"train.max_steps": 3}, None)
        assert objective.settings["train.max_steps"] == 3
        assert objective.terms
