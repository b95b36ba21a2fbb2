"""Diagnostics as the user sees them: golden renderings of bad specs and the rules every diagnostic follows.

Each tests/golden/errors/NAME.kd is a bad spec; NAME.err is its rendered
SpecError. Refresh the goldens with KDSL_UPDATE_GOLDEN=1. A spec whose first
line is `# check with same_vocab=False` is checked as a pair of models with
different tokenizers.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import kdsl
from kdsl.check import check
from kdsl.errors import Diagnostic, SpecError, Span
from kdsl.parse import decode, parse

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "errors"
UPDATE = os.environ.get("KDSL_UPDATE_GOLDEN") == "1"
SPECS = sorted(GOLDEN.glob("*.kd"))
# Terminal names of the grammar and lark's own words, which must never reach the user.
INTERNAL = re.compile(r"\b(RPAR|LPAR|RSQB|LSQB|EQUAL|E_OPEN|PARALLEL|COMPARE|__ANON\w*|\$END|Token\(|Tree\()")


def check_golden_spec(path: Path) -> SpecError:
    label = path.relative_to(ROOT).as_posix()
    data = path.read_bytes()
    same_vocab = False if data.startswith(b"# check with same_vocab=False") else None
    with pytest.raises(SpecError) as caught:
        check(parse(decode(data, label), label), same_vocab=same_vocab)
    return caught.value


def test_golden_table_is_large():
    assert len(SPECS) >= 30


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_error_golden(path):
    rendered = check_golden_spec(path).render() + "\n"
    golden = path.with_suffix(".err")
    if UPDATE:
        golden.write_text(rendered, encoding="utf-8")
    assert golden.exists(), f"missing golden {golden.name}; run with KDSL_UPDATE_GOLDEN=1 to write it"
    assert rendered == golden.read_text(encoding="utf-8")


def test_no_stale_goldens():
    stale = [p.name for p in GOLDEN.glob("*.err") if not p.with_suffix(".kd").exists()]
    assert stale == []


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_every_diagnostic_is_complete(path):
    error = check_golden_spec(path)
    for diagnostic in error.diagnostics:
        assert re.fullmatch(r"KD\d{3}", diagnostic.code)
        assert diagnostic.span is not None
        assert diagnostic.span.line >= 1
        assert diagnostic.span.column >= 1
        assert diagnostic.hint, f"{diagnostic.code} has no hint: {diagnostic.message}"
        assert not INTERNAL.search(diagnostic.message + " " + diagnostic.hint)
        rendered = diagnostic.render(error.source)
        assert f"--> {diagnostic.span.path}:{diagnostic.span.line}:{diagnostic.span.column}" in rendered
        assert "^" in rendered
        assert "\x00" not in rendered


def test_underline_covers_whole_token():
    source = "objective = lamda_weight(t, w) · KL(o ‖ q)"
    rendered = Diagnostic("KD101", "unknown function 'lamda_weight'", Span("s.kd", 1, 13, 1, 25), "hint").render(source)
    caret_line = rendered.splitlines()[4]
    assert caret_line.endswith(" " * 12 + "^" * 12)


def test_underline_aligns_after_wide_characters():
    source = "λ名前 = 1 + xx"
    rendered = Diagnostic("KD101", "unknown name 'xx'", Span("s.kd", 1, 11, 1, 13), "hint").render(source)
    # λ takes one column and each of 名前 two, so 12 columns precede xx.
    assert rendered.splitlines()[4] == "   | " + " " * 12 + "^^"


def test_underline_keeps_tabs():
    source = "objective =\tlamda · CE"
    rendered = Diagnostic("KD101", "unknown name 'lamda'", Span("s.kd", 1, 13, 1, 18), "hint").render(source)
    assert rendered.splitlines()[4] == "   | " + " " * 11 + "\t^^^^^"


def test_error_at_end_of_input_has_real_line():
    with pytest.raises(SpecError) as caught:
        kdsl.load("x = 1\nobjective = KL(o ‖ q\n\n\n")
    (diagnostic,) = caught.value.diagnostics
    assert diagnostic.span.line == 2
    assert diagnostic.span.column == 21


def test_semantic_errors_sorted_and_counted():
    error = check_golden_spec(GOLDEN / "multiple_errors.kd")
    errors = [d for d in error.diagnostics if d.severity == "error"]
    assert len(errors) >= 4
    keys = [(d.span.line, d.span.column) for d in error.diagnostics]
    assert keys == sorted(keys)
    assert error.render().endswith(f"{len(errors)} errors in spec")


def test_warnings_render_with_codes():
    objective = kdsl.load("sgo.max_new_tokens = 32\nobjective = KL(o ‖ q)")
    (warning,) = objective.warnings
    rendered = warning.render(objective.source_text)
    assert rendered.startswith("warning[KD153]: setting 'sgo.max_new_tokens' has no effect")
    assert "<string>:1:1" in rendered
    assert "^^^^^^^^^^^^^^^^^^" in rendered
