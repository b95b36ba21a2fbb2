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
