"""The parser: spellings, spans, the syntax tree and syntax errors as the user sees them."""

from __future__ import annotations

import pytest

from kdsl import ast
from kdsl.errors import SpecError
from kdsl.parse import MAX_NESTING, MAX_SPEC_CHARS, canonical_name, decode, parse


def objective_of(text: str):
    spec = parse(text)
    (statement,) = [s for s in spec.statements if isinstance(s, ast.Assignment) and s.target.id == "objective"]
    return statement.value


def shape(node) -> list:
    """Reduce a syntax tree to canonical names and operators, ignoring spelling and spans."""
    out = []
    for item in ast.walk(node):
        if isinstance(item, ast.Name):
            out.append(item.id)
        elif isinstance(item, ast.Number):
            out.append(item.value)
        elif isinstance(item, (ast.BinaryOp, ast.Compare)):
            out.append(item.op)
        elif isinstance(item, ast.Call):
            out.append(("call", len(item.args)))
        else:
            out.append(type(item).__name__)
    return out


def syntax_error(text: str):
    with pytest.raises(SpecError) as caught:
        parse(text, "spec.kd")
    (diagnostic,) = caught.value.diagnostics
    return diagnostic, caught.value.render()


# --- spellings --------------------------------------------------------------------------------


@pytest.mark.parametrize("written, canonical", [
    ("lambda", "λ"), ("λ", "λ"), ("phi", "φ"), ("ϕ", "φ"), ("epsilon", "ε"), ("ϵ", "ε"),
    ("µ", "μ"), ("𝜆", "λ"), ("alpha_kd", "α_kd"), ("w_alpha", "w_α"), ("sum", "Σ"), ("Sigma", "Σ"),
    ("train.epochs", "train.epochs"), ("rho.clip", "rho.clip"), ("betas", "betas"), ("ｘ", "x"),
])
def test_canonical_name_folds_lookalikes(written, canonical):
    assert canonical_name(written) == canonical


def test_ascii_and_unicode_specs_parse_alike():
    unicode = "objective = E[w ~ λ·d_q + (1 − λ)·d_data] JS[β](o ‖ q→o) + φ(epoch)·KL(o[τ=2] ∥ q) + x ≤ 1 + a^2"
    ascii_ = "objective = E[w ~ lambda*d_q + (1 - lambda)*d_data] JS[beta](o || q->o) + phi(epoch)*KL(o[tau=2] || q) + x <= 1 + a**2"
    assert shape(objective_of(unicode)) == shape(objective_of(ascii_))


@pytest.mark.parametrize("op", ["*", "·", "×", "⋅"])
def test_multiplication_spellings(op):
    assert objective_of(f"objective = 2 {op} CE").op == "*"


@pytest.mark.parametrize("op, canonical", [("≤", "<="), ("<=", "<="), ("≥", ">="), (">=", ">="), ("<", "<"), ("==", "==")])
def test_comparison_spellings(op, canonical):
    value = objective_of(f"objective = where(t {op} 3, 1, 0)")
    assert value.args[0].op == canonical


def test_divergence_separator_recorded():
    call = objective_of("objective = KL(o ‖ q) + TV(o, q)")
    assert call.left.separators == ("‖",)
    assert call.right.separators == (",",)


def test_eval_keyword_is_not_a_prefix():
    spec = parse("evaluate = 1\neval_x = 2\nobjective = CE\neval ce, rouge_l(max_new_tokens=8)")
    names = [s.target.id for s in spec.statements if isinstance(s, ast.Assignment)]
    assert names == ["evaluate", "eval_x", "objective"]
    (line,) = [s for s in spec.statements if isinstance(s, ast.EvalLine)]
    assert [item.name.id for item in line.items] == ["ce", "rouge_l"]


def test_expectation_allows_space_before_bracket():
    value = objective_of("objective = E [w ~ d_q] KL(o ‖ q)")
    assert isinstance(value, ast.Expectation)
    assert value.distribution.id == "d_q"


def test_expectation_body_is_one_product():
    value = objective_of("objective = E[w ~ d_q] 2·KL(o ‖ q) + CE")
    assert isinstance(value, ast.BinaryOp) and value.op == "+"
    assert isinstance(value.left, ast.Expectation)
    assert isinstance(value.right, ast.Name) and value.right.id == "CE"


def test_unary_minus_binds_looser_than_power():
    value = objective_of("objective = -x^2")
    assert isinstance(value, ast.Negate)
    assert value.operand.op == "^"


# --- spans -----------------------------------------------------------------------------------


def test_spans_cover_whole_tokens():
    value = objective_of("objective = lambda_1(t, w) · KL(o ‖ q)")
    call = value.left
    assert (call.func.span.line, call.func.span.column, call.func.span.end_column) == (1, 13, 21)
    assert call.func.text == "lambda_1"
    assert call.func.id == "λ_1"
    kl = value.right
    assert (kl.span.column, kl.span.end_column) == (30, 39)


def test_spans_on_later_lines():
    spec = parse("# comment\n\nx = 1\nobjective = x · CE\n", "a.kd")
    statement = spec.statements[1]
    assert str(statement.value.right.span) == "a.kd:4:17"


def test_expectation_head_span():
    value = objective_of("objective = E[w ~ d_q] KL(o ‖ q)")
    assert (value.head_span.column, value.head_span.end_column) == (13, 23)


# --- syntax errors -----------------------------------------------------------------------------


INTERNAL_NAMES = ("RPAR", "LPAR", "$END", "RSQB", "LSQB", "__ANON", "EQUAL", "NAME", "NUMBER", "Token(", "E_OPEN")


@pytest.mark.parametrize("text", [
    "objective = KL(o ‖ q", "objective = KL(o ‖ q))", "objective = ", "objective KL(o‖q)",
    "objective = KL(o ‖ q) CE", "x = = 3", "objective = E[w ~ d_q KL(o‖q)", "f(1) = 2",
    "objective = KL(o ‖ q) +", "objective = o[", "eval", "objective = 2 3",
])
def test_syntax_errors_use_human_words(text):
    diagnostic, rendered = syntax_error(text)
    for name in INTERNAL_NAMES:
        assert name not in diagnostic.message
        assert name not in (diagnostic.hint or "")
    assert diagnostic.hint
    assert "spec.kd:1:" in rendered
    assert "^" in rendered


def test_end_of_input_points_past_last_token():
    diagnostic, rendered = syntax_error("x = 1\nobjective = KL(o ‖ q\n\n# trailing comment\n")
    assert diagnostic.code == "KD012"
    assert (diagnostic.span.line, diagnostic.span.column) == (2, 21)
    assert "1 bracket is still open" in diagnostic.hint
    assert " 2 | objective = KL(o ‖ q" in rendered


def test_empty_spec_error_at_line_one():
    with pytest.raises(SpecError) as caught:
        parse("objective =", "e.kd")
    (diagnostic,) = caught.value.diagnostics
    assert (diagnostic.span.line, diagnostic.span.column) == (1, 12)
    assert "expected an expression" in diagnostic.message


def test_stray_name_is_underlined():
    diagnostic, rendered = syntax_error("objective = KL(o ‖ q) CE")
    assert diagnostic.code == "KD013"
    assert (diagnostic.span.column, diagnostic.span.end_column) == (23, 25)
    assert "'+ CE'" in diagnostic.hint
    assert rendered.splitlines()[4].endswith("^^")


def test_unexpected_token_underlines_token():
    diagnostic, _ = syntax_error("objective = 2 3.5")
    assert diagnostic.code == "KD011"
    assert diagnostic.message.startswith("unexpected number 3.5; expected")
    assert (diagnostic.span.column, diagnostic.span.end_column) == (15, 18)
    assert "operator" in diagnostic.hint


@pytest.mark.parametrize("char, hint", [("{", "parentheses"), (";", "no separator"), ("\x00", "invisible"),
                                        ("\u202e", "invisible"), ("!", "no '!'"), ("$", "names use")])
def test_unexpected_character_hints(char, hint):
    diagnostic, rendered = syntax_error(f"objective = CE {char} 1")
    assert diagnostic.code == "KD010"
    assert f"U+{ord(char):04X}" in diagnostic.message
    assert hint in diagnostic.hint
    assert "\x00" not in rendered
    assert "\u202e" not in rendered


def test_unterminated_string():
    diagnostic, _ = syntax_error('teacher = "builtin:tiny\nobjective = CE')
    assert diagnostic.code == "KD010"
    assert "quote" in diagnostic.hint


# --- limits --------------------------------------------------------------------------------------


def test_too_long_spec():
    diagnostic, _ = syntax_error("#" * (MAX_SPEC_CHARS + 1))
    assert diagnostic.code == "KD001"
    assert str(MAX_SPEC_CHARS) in diagnostic.message


def test_too_deep_expression():
    diagnostic, _ = syntax_error("objective = " + " + ".join(["CE"] * (MAX_NESTING + 5)))
    assert diagnostic.code == "KD002"
    assert diagnostic.span.line == 1


def test_nesting_at_limit_parses():
    parse("objective = " + " + ".join(["CE"] * MAX_NESTING))


@pytest.mark.parametrize("number", ["1e999999", "1e301", "1" * 41, "1e-999", "0.0000" + "0" * 400 + "1"])
def test_numbers_out_of_range(number):
    diagnostic, _ = syntax_error(f"objective = {number} · CE")
    assert diagnostic.code == "KD003"
    assert (diagnostic.span.column, diagnostic.span.end_column) == (13, 13 + len(number))


@pytest.mark.parametrize("number, value", [("3e-4", 3e-4), (".5", 0.5), ("1.", 1.0), ("1e300", 1e300), ("0", 0.0)])
def test_numbers_in_range(number, value):
    assert objective_of(f"objective = {number} · CE").left.value == value


def test_invalid_utf8_is_positioned():
    with pytest.raises(SpecError) as caught:
        decode(b"x = 1\nobjective = \xff CE\n", "bad.kd")
    (diagnostic,) = caught.value.diagnostics
    assert diagnostic.code == "KD004"
    assert (diagnostic.span.line, diagnostic.span.column) == (2, 13)
    assert "0xff" in diagnostic.message
