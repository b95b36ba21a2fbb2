"""LaTeX output: the user's term order and names, every construct, goldens for every shipped spec, real compilation.

Refresh tests/golden/latex/*.tex with KDSL_UPDATE_GOLDEN=1. The compilation
test needs pdflatex (Debian/Ubuntu: `apt-get install -y --no-install-recommends
texlive-latex-base texlive-fonts-recommended`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import kdsl
from kdsl.check import check
from kdsl.errors import InternalError
from kdsl.latex import LatexPrinter, latex_name, latex_number, render
from kdsl.parse import parse

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "latex"
SPECS = sorted((ROOT / "specs").glob("*.kd"))
UPDATE = os.environ.get("KDSL_UPDATE_GOLDEN") == "1"
PDFLATEX = shutil.which("pdflatex")


def latex_of(text: str, **kwargs) -> str:
    return render(kdsl.load(text), **kwargs)


def load_spec(path: Path):
    label = path.relative_to(ROOT).as_posix()
    return check(parse(path.read_text(encoding="utf-8"), label))


# --- names and numbers -------------------------------------------------------------------------


@pytest.mark.parametrize("name, expected", [
    ("λ", r"\lambda"), ("φ", r"\varphi"), ("ε", r"\varepsilon"), ("Σ", r"\Sigma"), ("α_kd", r"\alpha_{\mathrm{kd}}"),
    ("w_t", "w_t"), ("x_1", "x_{1}"), ("epoch", r"\mathrm{epoch}"), ("q", r"q_\theta"), ("d_data", r"d_{\mathrm{data}}"),
    ("d_q", r"d_{q_\theta}"), ("my_long_name", r"\mathrm{my}_{\mathrm{long}\_\mathrm{name}}"), ("é", r"\mathrm{e}"),
    ("名", r"\mathrm{u540d}"), ("__class__", r"\mathrm{\_\_class\_\_}"), ("_", r"\mathrm{\_}"),
])
def test_latex_names(name, expected):
    assert latex_name(name) == expected


@pytest.mark.parametrize("text, expected", [("0.5", "0.5"), ("3e-4", r"3 \cdot 10^{-4}"), ("1e5", "10^{5}"), (".25", "0.25"), ("2.", "2")])
def test_latex_numbers(text, expected):
    assert latex_number(text) == expected


# --- structure -----------------------------------------------------------------------------------


def test_term_order_is_kept():
    first = latex_of("objective = CE + KL(o ‖ q)")
    second = latex_of("objective = KL(o ‖ q) + CE")
    assert r"\mathrm{CE} + D_{\mathrm{KL}}" in first
    assert r"D_{\mathrm{KL}}\left(o \,\|\, q_\theta\right) + \mathrm{CE}" in second


def test_factor_order_is_kept():
    assert r"D_{\mathrm{KL}}\left(o \,\|\, q_\theta\right) \cdot 2" in latex_of("objective = KL(o ‖ q) · 2")
    assert r"2 \, D_{\mathrm{KL}}\left(o \,\|\, q_\theta\right)" in latex_of("objective = 2 · KL(o ‖ q)")


def test_ascii_and_unicode_render_alike():
    unicode = latex_of("λ = 0.5\nφ(epoch) = 1 - epoch / 2\nobjective = E[w ~ λ·d_q + (1 − λ)·d_data] φ(epoch)·JS[λ](o ‖ q)")
    ascii_ = latex_of("lambda = 0.5\nphi(epoch) = 1 - epoch / 2\nobjective = E[w ~ lambda*d_q + (1 - lambda)*d_data] phi(epoch)*JS[lambda](o || q)")
    assert unicode == ascii_


def test_output_is_ascii():
    text = latex_of("ϕ(epoch) = 1 + 0·epoch\nobjective = ϕ(epoch) · KL(o ‖ q)")
    assert text.isascii()
    assert r"\varphi(\mathrm{epoch})" in text


def test_expectation_and_definitions():
    text = render(kdsl.load(str(ROOT / "specs" / "wsgo.kd")))
    assert r"\mathbb{E}_{w \sim 0.5 \, d_{q_\theta} + 0.5 \, d_{\mathrm{data}}}" in text
    assert r"\lambda(t, w) &= e^{-t / 256} \left(1 - o(w_t)\right)" in text
    assert r"\varphi(\mathrm{epoch}) &= 0.5 \left(1 + \cos\left(\frac{\pi \, \mathrm{epoch}}{2}\right)\right)" in text
    assert text.index(r"\lambda(t, w) &=") < text.index(r"\varphi(\mathrm{epoch}) &=")


def test_only_used_definitions_in_spec_order():
    text = latex_of("b(epoch) = 1 + epoch\nunused = 3\na(t) = 1 / t\nobjective = a(t) · b(epoch) · KL(o ‖ q)")
    assert r"\mathrm{unused}" not in text
    assert text.index("b(\\mathrm{epoch}) &=") < text.index("a(t) &=")


@pytest.mark.parametrize("reduction, fragment", [("token", "(reduction: token)"), ("sequence", "(reduction: sequence)")])
def test_reduction_is_named(reduction, fragment):
    text = latex_of(f'reduction = "{reduction}"\nobjective = KL(o ‖ q)')
    assert fragment in text
    assert text.startswith(f"% kdsl objective from <string>, reduction: {reduction}")


def test_bare_terms_and_ce_explained():
    text = latex_of("objective = E[w ~ d_q] KL(o ‖ q) + CE")
    assert r"$\mathrm{CE} = -\log q_\theta(w_t)$" in text
    assert r"a term outside $\mathbb{E}$ is an expectation under $w \sim d_{\mathrm{data}}$" in text
    assert "outside" not in latex_of("objective = E[w ~ d_q] KL(o ‖ q)")


def test_long_objective_one_term_per_line():
    text = latex_of("objective = KL(o ‖ q) + TV(o, q) - 0.1 · H(q)")
    assert "&\\quad + D_{\\mathrm{TV}}\\left(o, q_\\theta\\right) \\\\" in text
    assert "&\\quad - 0.1 \\, \\mathrm{H}\\left(q_\\theta\\right)" in text


@pytest.mark.parametrize("objective, fragment", [
    ("KL(o ‖ q)", r"D_{\mathrm{KL}}\left(o \,\|\, q_\theta\right)"),
    ("JS[0.5](o ‖ q)", r"D_{\mathrm{JS}}^{(0.5)}\left(o \,\|\, q_\theta\right)"),
    ("TV(o, q)", r"D_{\mathrm{TV}}\left(o, q_\theta\right)"),
    ("SKL[0.1](o ‖ q)", r"D_{\mathrm{SKL}}^{(0.1)}\left(o \,\|\, q_\theta\right)"),
    ("SRKL[0.1](o ‖ q)", r"D_{\mathrm{SRKL}}^{(0.1)}\left(o \,\|\, q_\theta\right)"),
    ("H(q) + H(o, q)", r"\mathrm{H}\left(q_\theta\right) + \mathrm{H}\left(o, q_\theta\right)"),
    ("ULD(o, q)", r"\mathrm{ULD}\left(o, q_\theta\right)"),
    ("KL(o→q ‖ q) + KL(q→o ‖ o)", r"o^{\rightarrow q} \,\|\, q_\theta\right) + D_{\mathrm{KL}}\left(q_\theta^{\rightarrow o}"),
    ("KL(o[τ=2, top_k=64] ‖ q[τ=2])", r"o^{\tau=2,\, \mathrm{top}\text{-}64} \,\|\, q_\theta^{\tau=2}"),
    ("KL(o ‖ 0.1·o + 0.9·q)", r"\left(o \,\|\, 0.1 \, o + 0.9 \, q_\theta\right)"),
    ("E[w ~ adaptive(d_q, d_data, init_prob=0.2)] KL(o ‖ q)", r"\mathrm{adaptive}\left(d_{q_\theta}, d_{\mathrm{data}}; \mathrm{init\_prob} = 0.2\right)"),
    ("E[w ~ d_o] KL(o ‖ q)", r"\mathbb{E}_{w \sim d_{o}}\left[D_{\mathrm{KL}}"),
    ("E[w ~ 0.2·d_q + 0.3·d_o + 0.5·d_data] KL(o ‖ q)", r"w \sim 0.2 \, d_{q_\theta} + 0.3 \, d_{o} + 0.5 \, d_{\mathrm{data}}"),
])
def test_constructs(objective, fragment):
    assert fragment in latex_of(f"objective = {objective}")


@pytest.mark.parametrize("definition, fragment", [
    ("g(t) = where(t <= 16, 1, 0.5)", r"\begin{cases} 1 & \text{if } t \le 16 \\ 0.5 & \text{otherwise} \end{cases}"),
    ("g(t) = sqrt(abs(t - 3))", r"\sqrt{\left|t - 3\right|}"),
    ("g(t) = min(1, t / 8)", r"\min\left(1, \frac{t}{8}\right)"),
    ("g(t) = clip(t / 8, 0, 1)", r"\operatorname{clip}\left(\frac{t}{8}, 0, 1\right)"),
    ("g(t) = sigmoid(t) · tanh(t)", r"\sigma\left(t\right) \, \tanh\left(t\right)"),
    ("g(t) = (1 - t / 64)^2", r"\left(1 - \frac{t}{64}\right)^{2}"),
    ("g(t) = -(t - 1) + 64", r"-\left(t - 1\right) + 64"),
    ("g(t) = 65 - (t - 1)", r"65 - \left(t - 1\right)"),
    ("g(t, w) = q(w_t) / o(w_t)", r"\frac{q_\theta(w_t)}{o(w_t)}"),
    ("g(T, w) = exp(Σ(log(q(w_t))) / T)", r"e^{\sum_{t=1}^{T} \log\left(q_\theta(w_t)\right) / T}"),
])
def test_weight_constructs(definition, fragment):
    head = definition.split("=")[0].strip()
    args = head[head.index("("):]
    assert fragment in latex_of(f"{definition}\nobjective = g{args} · KL(o ‖ q)")


def test_sequence_weight_and_generator():
    text = latex_of('ref = "builtin:tiny-teacher"\nρ(w) = ref(w) / q(w)\nf(x) = x·log(x)\nobjective = ρ(w) · Df[f](o ‖ q)')
    assert r"\rho(w) &= \frac{p_{\mathrm{ref}}(w)}{q_\theta(w)}" in text
    assert r"D_{f}\left(o \,\|\, q_\theta\right)" in text
    assert r"f(x) &= x \, \log\left(x\right)" in text


CLIP_REF = 'ref = "builtin:tiny-ref"\nrho.clip = 2\n'


def test_clipped_sequence_weight_shown_as_min():
    text = latex_of(CLIP_REF + "ρ(T, w) = (ref(w) / q(w))^(1/T)\nobjective = E[w ~ d_o] ρ(T, w) · KL(o ‖ q)")
    assert r"\min\left(\rho(T, w), 2\right) \, D_{\mathrm{KL}}" in text
    assert r"\rho(T, w) &= \left(\frac{p_{\mathrm{ref}}(w)}{q_\theta(w)}\right)^{1 / T}" in text
    assert "clipped" not in text  # the formula shows the clip, so the sentence does not repeat it


def test_unclipped_sequence_weight_has_no_min():
    text = latex_of('ref = "builtin:tiny-ref"\nρ(T, w) = (ref(w) / q(w))^(1/T)\nobjective = ρ(T, w) · CE')
    assert r"\min" not in text
    assert "clipped" not in text


@pytest.mark.parametrize("objective", [
    "(ref(w) / q(w))^(1/T) · KL(o ‖ q)",  # an inline weight: no call to wrap
    "ρ(T, w)^2 · KL(o ‖ q) + ρ(T, w) · CE",  # ρ² is clipped as a whole, not min(ρ, 2)²
    "ρ(T, w) · σ(T, w) · KL(o ‖ q)",  # a product of two weights is clipped as a whole
])
def test_clip_stated_in_sentence_when_min_is_inexact(objective):
    definitions = "ρ(T, w) = (ref(w) / q(w))^(1/T)\nσ(T, w) = exp(-T / 64) · ref(w)\n"
    text = latex_of(CLIP_REF + definitions + f"objective = {objective}")
    assert r"\min\left(" not in text
    assert r"is applied clipped, as $\min(\cdot, 2)$" in text


def test_settings_become_values():
    text = latex_of("train.epochs = 4\nφ(epoch) = epoch / train.epochs\nobjective = φ(epoch) · CE")
    assert r"\varphi(\mathrm{epoch}) &= \frac{\mathrm{epoch}}{4}" in text


def test_user_names_cannot_reach_printer_dispatch():
    text = latex_of("Plus(t) = 1 / t\nAdd = 2\nobjective = Add · Plus(t) · KL(o ‖ q)")
    assert r"\mathrm{Add} \, \mathrm{Plus}(t)" in text


def test_unknown_node_is_internal_error():
    import sympy

    with pytest.raises(InternalError, match="no rule"):
        LatexPrinter().doprint(sympy.Integer(3))


def test_standalone_document():
    text = latex_of("objective = KL(o ‖ q)", standalone=True)
    assert "\\documentclass{article}\n\\usepackage{amsmath}\n\\usepackage{amssymb}\n\\begin{document}" in text
    assert text.endswith("\\end{document}\n")


# --- goldens for every shipped spec ---------------------------------------------------------------


def test_every_spec_has_a_golden():
    assert SPECS
    missing = [p.stem for p in SPECS if not (GOLDEN / f"{p.stem}.tex").exists() and not UPDATE]
    assert missing == [], f"missing LaTeX goldens {missing}; run with KDSL_UPDATE_GOLDEN=1 to write them"
    stale = [p.name for p in GOLDEN.glob("*.tex") if not (ROOT / "specs" / f"{p.stem}.kd").exists()]
    assert stale == []


@pytest.mark.parametrize("spec", SPECS, ids=[p.stem for p in SPECS])
def test_latex_golden(spec):
    text = render(load_spec(spec), standalone=True)
    golden = GOLDEN / f"{spec.stem}.tex"
    if UPDATE:
        GOLDEN.mkdir(parents=True, exist_ok=True)
        golden.write_text(text, encoding="utf-8")
    assert golden.exists(), f"missing golden {golden.name}; run with KDSL_UPDATE_GOLDEN=1 to write it"
    assert text == golden.read_text(encoding="utf-8")
    assert text.isascii()


@pytest.mark.skipif(PDFLATEX is None, reason="no LaTeX engine: apt-get install -y --no-install-recommends "
                    "texlive-latex-base texlive-fonts-recommended")
def test_goldens_compile_with_pdflatex(tmp_path):
    goldens = sorted(GOLDEN.glob("*.tex"))
    assert goldens
    for golden in goldens:
        shutil.copy(golden, tmp_path / golden.name)
        result = subprocess.run(
            [PDFLATEX, "-interaction=nonstopmode", "-halt-on-error", "-no-shell-escape", golden.name],
            cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 0, f"{golden.name} failed to compile:\n{result.stdout[-3000:]}"
        assert (tmp_path / golden.with_suffix(".pdf").name).stat().st_size > 1000
