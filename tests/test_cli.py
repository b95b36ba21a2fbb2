"""The command line as a user calls it: exit codes and what reaches stdout and stderr."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kdsl.cli import main, parse_assignments
from kdsl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_check_prints_terms(capsys):
    assert main(["check", str(ROOT / "specs" / "wsgo.kd")]) == 0
    out = capsys.readouterr().out
    assert "KL(o‖q)" in out
    assert "CE" in out


def test_check_missing_spec_names_path(capsys):
    assert main(["check", "no/such/spec.kd"]) == 2
    err = capsys.readouterr().err
    assert "spec file not found" in err
    assert "no/such/spec.kd" in err


def test_unknown_setting_gets_hint(capsys):
    assert main(["check", str(ROOT / "specs" / "kd.kd"), "--set", "train.lrr=1e-4"]) == 1
    err = capsys.readouterr().err
    assert "KD102" in err
    assert "did you mean 'train.lr'?" in err


def test_spec_error_shows_caret(tmp_path, capsys):
    spec = tmp_path / "bad.kd"
    spec.write_text("objective = KL(o ‖ qq)\n", encoding="utf-8")
    assert main(["check", str(spec)]) == 1
    err = capsys.readouterr().err
    assert f"{spec}:1:20" in err
    assert "^^" in err


def test_out_of_range_override(capsys):
    assert main(["check", str(ROOT / "specs" / "kd.kd"), "--set", "train.lr=5"]) == 1
    assert "out of range" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["train.lr", "=3", ""])
def test_malformed_set_rejected(bad):
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_assignments([bad])


def test_settings_lists_defaults(capsys):
    assert main(["settings"]) == 0
    assert "train.lr = 0.0003" in capsys.readouterr().out


def test_module_entry_point_help():
    result = subprocess.run([sys.executable, "-m", "kdsl", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0
    assert "run" in result.stdout
    assert "check" in result.stdout


@pytest.mark.parametrize(("spec", "student"), [("wsgo.kd", "builtin:tiny-student"),
                                               ("dskd.kd", "builtin:tiny-student-unigram")])
def test_eval_scores_a_saved_student(tmp_path, capsys, spec, student):
    """kdsl eval on a saved model folder; with two tokenizers it scores what the student's tokenizer defines."""
    from kdsl import models

    folder = tmp_path / "student"
    models.load_model(student).save_pretrained(folder)
    models.load_tokenizer(student).save_pretrained(folder)
    code = main(["eval", str(ROOT / "specs" / spec), "--checkpoint", str(folder), "--out", str(tmp_path / "eval"),
                 "--set", "eval.max_pairs=2", "--set", "eval.max_new_tokens=4", "--set", "eval.bootstrap=20",
                 "--set", "eval.max_l=2"])
    out = capsys.readouterr().out
    assert code == 0, out
    import json

    document = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    heldout = document["checkpoints"]["student"]["heldout"]
    assert heldout["ce"] > 0
    assert heldout["num_pairs"] == 2
    if spec == "dskd.kd":
        assert "has its own tokenizer" in out
        assert heldout["kl"] is None
        assert document["checkpoints"]["student"]["exposure_bias"] is None
    else:
        assert heldout["kl"] is not None


def test_explain_reads_shapes_from_the_spec(capsys):
    assert main(["explain", str(ROOT / "specs" / "dskd.kd")]) == 0
    out = capsys.readouterr().out
    assert "B=8 T=64 Vs=3000 Vt=4096" in out  # train.batch_size, 32 + 32 tokens, the two builtin vocabularies
    assert main(["explain", str(ROOT / "specs" / "dskd.kd"), "--batch", "2", "--student-vocab", "50"]) == 0
    assert "B=2 T=64 Vs=50 Vt=4096" in capsys.readouterr().out


def test_explain_keeps_defaults_for_hub_models(capsys):
    from kdsl import models

    assert models.local_config("some-org/some-model") is None  # a hub id: nothing is read, nothing is fetched
    assert main(["explain", str(ROOT / "specs" / "kd.kd"), "--set", "student=some-org/some-model",
                 "--set", "teacher=some-org/other-model"]) == 0
    assert "Vs=32000 Vt=32000" in capsys.readouterr().out


def test_explain_rejects_a_zero_length(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["explain", str(ROOT / "specs" / "gkd.kd"), "--length", "0"])
    assert exited.value.code == 2
    assert "--length: invalid value 0: expected a positive number" in capsys.readouterr().err


def test_eval_uses_the_settings_a_run_saved(tmp_path, capsys):
    """A run directory's settings.json (the run's --set overrides included) win over the spec; --set wins over both."""
    import json

    from kdsl import models

    run = tmp_path / "run"
    models.load_model("builtin:tiny-student").save_pretrained(run / "student")
    models.load_tokenizer("builtin:tiny-student").save_pretrained(run / "student")
    (run / "settings.json").write_text(json.dumps({"eval.max_pairs": 2, "eval.max_new_tokens": 3,
                                                   "data.max_prompt_tokens": 8, "not.a.setting": 1}))
    common = ["eval", str(ROOT / "specs" / "wsgo.kd"), "--checkpoint", str(run), "--set", "eval.bootstrap=10",
              "--set", "eval.max_l=2"]
    assert main(common + ["--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "data.max_prompt_tokens, eval.max_new_tokens, eval.max_pairs" in out
    document = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert document["checkpoints"]["run"]["heldout"]["num_pairs"] == 2
    assert main(common + ["--set", "eval.max_pairs=3", "--out", str(tmp_path / "b")]) == 0
    document = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert document["checkpoints"]["run"]["heldout"]["num_pairs"] == 3
