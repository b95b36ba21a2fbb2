"""The checker: every construct end to end, the validator's checks, desugaring and the canonical hash."""

from __future__ import annotations

import math

import numpy as np
import pytest
import sympy

import kdsl
from kdsl import algebra
from kdsl import objective as obj
from kdsl.check import canonical_hash, format_objective
from kdsl.errors import SpecError


def load(text: str, **kwargs) -> obj.Objective:
    return kdsl.load(text if "objective" in text else f"objective = {text}", **kwargs)


def errors(text: str, **kwargs) -> list:
    with pytest.raises(SpecError) as caught:
        load(text, **kwargs)
    return [d for d in caught.value.diagnostics if d.severity == "error"]


def one_error(text: str, code: str, **kwargs):
    found = errors(text, **kwargs)
    assert [d.code for d in found] == [code], [d.render() for d in found]
    return found[0]


def warning_codes(text: str, **kwargs) -> list[str]:
    return [d.code for d in load(text, **kwargs).warnings]


def numeric(expr: sympy.Expr, **values) -> float:
    symbols = {"t": obj.POSITION, "T": obj.LENGTH, "epoch": obj.EPOCH, "step": obj.STEP, "progress": obj.PROGRESS,
               "log_o": obj.LOG_O_TOKEN, "log_q": obj.LOG_Q_TOKEN, "log_o_w": obj.LOG_O_SEQ, "log_q_w": obj.LOG_Q_SEQ,
               "log_ref_w": obj.LOG_REF_SEQ}
    bound = {symbols[name]: np.array([value], dtype=float) for name, value in values.items()}
    return float(algebra.evaluate_numeric(expr, bound)[0])


# --- sources -------------------------------------------------------------------------------------


@pytest.mark.parametrize("source, kind", [
    ("d_data", obj.DataSource), ("d_o", obj.TeacherSource), ("d_q", obj.StudentSource),
    ("adaptive(d_q, d_data)", obj.AdaptiveSource), ("0.2·d_q + 0.3·d_o + 0.5·d_data", obj.MixtureSource),
])
def test_prefix_distributions(source, kind):
    objective = load(f"E[w ~ {source}] KL(o ‖ q)")
    assert isinstance(objective.groups[0], kind)


def test_mixture_of_three_sources():
    (source,) = load("E[w ~ 0.2·d_q + 0.3·d_o + 0.5·d_data] KL(o ‖ q)").groups
    assert [c.expr for c, _ in source.components] == [sympy.Rational(1, 5), sympy.Rational(3, 10), sympy.Rational(1, 2)]
    assert source.per == "batch"


def test_mixture_per_sequence_setting():
    (source,) = load('mixture.per = "sequence"\nobjective = E[w ~ 0.5·d_q + 0.5·d_data] KL(o ‖ q)').groups
    assert source.per == "sequence"


def test_adaptive_options_resolve():
    (source,) = load("E[w ~ adaptive(d_q, d_data, init_prob=0.2, replay_capacity=10)] KL(o ‖ q)").groups
    params = dict(source.params)
    assert params["init_prob"] == 0.2
    assert params["replay_capacity"] == 10
    assert params["max_prob"] == 0.5


def test_bare_term_is_under_d_data():
    objective = load("E[w ~ d_q] KL(o ‖ q) + CE")
    assert isinstance(objective.groups[objective.terms[1].group], obj.DataSource)


def test_same_source_shares_group():
    objective = load("E[w ~ 0.5·d_q + 0.5·d_data] KL(o ‖ q) + E[w ~ d_q] H(q) + E[w ~ 0.5·d_q + 0.5·d_data] TV(o, q)")
    assert [t.group for t in objective.terms] == [0, 1, 0]
    assert len(objective.groups) == 2


# --- distributions and divergences ---------------------------------------------------------------


def test_convex_mixture_distribution():
    (term,) = load("α = 0.3\nobjective = KL(o ‖ α·o + (1 - α)·q)").terms
    mixture = term.loss.args[1]
    assert isinstance(mixture, obj.MixtureDist)
    assert [(c.expr, d.model) for c, d in mixture.components] == [(sympy.Rational(3, 10), "o"), (sympy.Rational(7, 10), "q")]


def test_temperature_and_top_k():
    (term,) = load("KL(o[τ=2, top_k=64] ‖ q[tau=2])").terms
    teacher, student = term.loss.args
    assert teacher.temperature.expr == 2
    assert teacher.top_k == 64
    assert student.temperature.expr == 2
    assert student.top_k is None


def test_temperature_schedule():
    (term,) = load("τ(epoch) = 1 + epoch\nobjective = KL(o[τ=τ(epoch)] ‖ q)").terms
    assert term.loss.args[0].temperature.expr == 1 + obj.EPOCH


def test_projections_are_typed():
    objective = load("KL(o→q ‖ q) + KL(q->o ‖ o)")
    first, second = (t.loss.args[0] for t in objective.terms)
    assert (first.source, first.vocab) == ("o", "student")
    assert (second.source, second.vocab) == ("q", "teacher")


@pytest.mark.parametrize("text, kind, arity", [
    ("KL(o ‖ q)", "KL", 2), ("JS[0.5](o ‖ q)", "JS", 2), ("TV(o, q)", "TV", 2), ("SKL[0.1](o ‖ q)", "SKL", 2),
    ("SRKL[0.1](o ‖ q)", "SRKL", 2), ("H(q)", "H", 1), ("H(o, q)", "H", 2), ("CE", "CE", 0), ("ULD(o, q)", "ULD", 2),
])
def test_divergence_kinds(text, kind, arity):
    (term,) = load(text).terms
    assert term.loss.kind == kind
    assert len(term.loss.args) == arity


def test_f_divergence_generator():
    (term,) = load("f(x) = x·log(x)\nobjective = Df[f](o ‖ q)").terms
    generator = term.loss.generator
    assert isinstance(generator, sympy.Lambda)
    (x,) = generator.variables
    assert generator.expr == x * sympy.log(x)


def test_skl_desugars_to_kl_of_mixture():
    objective = load("SKL[0.1](o ‖ q)")
    text = format_objective(objective, desugar=True)
    assert "KL(o ‖ 1/10·o + 9/10·q)" in text
    assert "# SKL[1/10](o ‖ q)" in text
    (part,) = objective.terms[0].loss.desugar()
    assert part[1].kind == "KL"


def test_js_desugars_to_two_kls():
    text = format_objective(load("JS[0.25](o ‖ q)"), desugar=True)
    assert "1/4·KL(o ‖ 1/4·o + 3/4·q) + 3/4·KL(q ‖ 1/4·o + 3/4·q)" in text


def test_srkl_desugars_with_arguments_swapped():
    assert "KL(q ‖ 1/10·q + 9/10·o)" in format_objective(load("SRKL[0.1](o ‖ q)"), desugar=True)


# --- weights and schedules -------------------------------------------------------------------------


def test_per_token_weight():
    (term,) = load("λ(t, w) = exp(-t / 256) · (1 - o(w_t))\nobjective = E[w ~ d_q] λ(t, w) · KL(o ‖ q)").terms
    assert term.token_weight.expr.free_symbols == {obj.POSITION, obj.LOG_O_TOKEN}
    assert numeric(term.token_weight.expr, t=256, log_o=math.log(0.25)) == pytest.approx(math.exp(-1) * 0.75)


def test_sequence_weight_in_log_space():
    (term,) = load('ref = "builtin:tiny-teacher"\nρ(w) = ref(w) / q(w)\nobjective = ρ(w) · CE').terms
    weight = term.sequence_weight.expr
    assert weight == sympy.exp(obj.LOG_REF_SEQ - obj.LOG_Q_SEQ)
    # Both log-probabilities are far below float range; their difference is not.
    assert numeric(weight, log_ref_w=-800.0, log_q_w=-801.0) == pytest.approx(math.e)


def test_ref_without_model_rejected():
    diagnostic = one_error("ρ(w) = ref(w) / q(w)\nobjective = ρ(w) · CE", "KD134")
    assert "ref =" in diagnostic.hint


@pytest.mark.parametrize("text", [
    "φ(epoch) = 0.5·(1 + cos(π·epoch))\nobjective = φ(epoch)·KL(o ‖ q)",
    "a(step) = min(1, step / 1000)\nobjective = E[w ~ a(step)·d_q + (1 - a(step))·d_data] KL(o ‖ q)",
    "b(progress) = 0.1 + 0.8·progress\nobjective = JS[b(progress)](o ‖ q)",
    "a(progress) = 0.05 + 0.1·progress\nobjective = SKL[a(progress)](o ‖ q)",
    "τ(epoch) = 1 + epoch\nobjective = KL(o[τ=τ(epoch)] ‖ q)",
    "a(progress) = progress\nobjective = KL(o ‖ a(progress)·o + (1 - a(progress))·q)",
])
def test_schedules_on_every_coefficient(text):
    objective = load(text)
    symbols = set()
    for term in objective.terms:
        symbols |= term.coefficient.roles
        symbols |= {s for d in term.loss.args for s in getattr(getattr(d, "temperature", None), "roles", ())}
        if term.loss.param is not None:
            symbols |= term.loss.param.roles
        for dist in term.loss.args:
            for coefficient, _ in getattr(dist, "components", ()):
                symbols |= coefficient.roles
    for group in objective.groups:
        for coefficient, _ in getattr(group, "components", ()):
            symbols |= coefficient.roles
    assert symbols & obj.SCHEDULE_ROLES


def test_schedule_evaluates():
    (term,) = load("φ(epoch) = 0.5·(1 + cos(π·epoch / train.epochs))\ntrain.epochs = 2\nobjective = φ(epoch)·CE").terms
    assert term.coefficient.evaluate(epoch=1.0) == pytest.approx(0.5)


def test_reduction_setting():
    assert load("KL(o ‖ q)").reduction == "token"
    assert load('reduction = "sequence"\nobjective = KL(o ‖ q)').reduction == "sequence"


def test_eval_lines():
    objective = load("objective = CE\neval ce, kl\neval rouge_l(max_new_tokens=16), exposure_bias")
    assert [m.name for m in objective.evals] == ["ce", "kl", "rouge_l", "exposure_bias"]
    assert objective.evals[2].args == (("max_new_tokens", 16.0),)


def test_unknown_eval_metric():
    diagnostic = one_error("objective = CE\neval rouge", "KD150")
    assert "rouge_l" in diagnostic.hint


# --- Σ over positions ----------------------------------------------------------------------------


def test_sum_of_log_probabilities_is_sequence_log_probability():
    (term,) = load("ρ(w) = exp(Σ(log(o(w_t))) - sum(log(q(w_t))))\nobjective = ρ(w) · KL(o ‖ q)").terms
    assert term.sequence_weight.expr == sympy.exp(obj.LOG_O_SEQ - obj.LOG_Q_SEQ)


@pytest.mark.parametrize("body, direct", [
    ("t", lambda t: t), ("exp(-t / 8)", lambda t: math.exp(-t / 8)), ("1 - t / 100", lambda t: 1 - t / 100), ("3", lambda t: 3),
])
def test_sum_over_positions_closed_form(body, direct):
    (term,) = load(f"n(T) = Σ({body})\nobjective = n(T) · KL(o ‖ q)").terms
    total = term.coefficient.expr * term.token_weight.expr
    for length in (1, 5, 12):
        assert numeric(total, T=length) == pytest.approx(sum(direct(t) for t in range(1, length + 1)))


def test_sum_without_closed_form_rejected():
    diagnostic = one_error("objective = Σ(1/t) · CE", "KD145")
    assert "harmonic" in diagnostic.message


def test_sum_of_probability_rejected():
    diagnostic = one_error("ρ(w) = Σ(o(w_t))\nobjective = ρ(w) · CE", "KD145")
    assert "log o(w_t)" in diagnostic.message


def test_sum_needs_one_argument():
    one_error("objective = sum(t, t) · CE", "KD113")


# --- names and arity -------------------------------------------------------------------------------


@pytest.mark.parametrize("text, hint", [
    ("lambda(t, w) = 1 - 0*t\nobjective = lamda(t, w)·KL(o ‖ q)", "did you mean 'lambda'?"),
    ("KLL(o ‖ q)", "did you mean 'KL'?"),
    ("E[w ~ d_qq] KL(o ‖ q)", "did you mean 'd_q'?"),
    ("φ(epoch) = epoch\nobjective = phii(epoch)·CE", "did you mean 'phi'?"),
    ("KL(о ‖ q)", "Cyrillic"),
])
def test_unknown_names_get_nearest(text, hint):
    diagnostic = [d for d in errors(text) if d.code == "KD101"][0]
    assert hint in diagnostic.hint


def test_unknown_setting_gets_nearest():
    diagnostic = one_error("train.lrr = 0.1\nobjective = CE", "KD102")
    assert diagnostic.hint == "did you mean 'train.lr'?"


@pytest.mark.parametrize("text, code", [
    ("KL(o, q, o)", "KD113"), ("H(o, q, o)", "KD113"), ("TV(o)", "KD113"), ("exp(1, 2)·CE", "KD113"),
    ("λ(t, w) = 1 + 0*t\nobjective = λ(t)·CE", "KD113"), ("JS(o ‖ q)", "KD133"), ("JS[0.1, 0.2](o ‖ q)", "KD133"),
    ("CE(o)", "KD122"), ("KL·2", "KD122"), ("min(1)·CE", "KD113"),
])
def test_arity(text, code):
    one_error(text, code)


def test_reserved_names_cannot_be_redefined():
    for name in ("KL", "o", "d_q", "exp", "t", "E", "sum", "Σ", "pi"):
        diagnostic = one_error(f"{name} = 0.5\nobjective = CE", "KD103")
        assert "another name" in diagnostic.hint


@pytest.mark.parametrize("name", ["I", "N", "Q", "S", "E1", "O", "beta", "gamma", "zeta", "lambda", "Lambda", "oo", "nan", "zoo"])
def test_sympy_names_are_user_constants(name):
    (term,) = load(f"{name} = 0.5\nobjective = {name}·KL(o ‖ q)").terms
    assert term.coefficient.expr == sympy.Rational(1, 2)


@pytest.mark.parametrize("name", ["N", "I", "S", "gamma", "beta", "Q", "lambda"])
def test_sympy_names_are_user_functions(name):
    (term,) = load(f"{name}(epoch) = 1 + epoch\nobjective = {name}(epoch)·CE").terms
    assert term.coefficient.expr == 1 + obj.EPOCH


def test_role_variable_must_be_parameter():
    diagnostic = one_error("λ(w) = exp(-t)\nobjective = λ(w)·CE", "KD110")
    assert diagnostic.hint == "add it: λ(w, t)"


def test_cycle_detected():
    assert "KD111" in [d.code for d in errors("a(t) = b(t)\nb(t) = a(t)\nobjective = a(t)·CE")]


# --- vocabularies ------------------------------------------------------------------------------------


def test_different_tokenizers_need_projection():
    diagnostic = one_error("KL(o ‖ q)", "KD130", same_vocab=False)
    assert "KL(o→q ‖ q)" in diagnostic.hint
    assert "teacher and student" in diagnostic.message


def test_projection_fixes_vocabularies():
    load("KL(o→q ‖ q) + KL(q→o ‖ o) + ULD(o, q)", same_vocab=False)


def test_mixture_across_vocabularies():
    one_error("KL(o ‖ 0.5·o + 0.5·q)", "KD130", same_vocab=False)
    load("KL(o ‖ 0.5·o + 0.5·q)", same_vocab=True)
    load("KL(o ‖ 0.5·o + 0.5·q)")


# --- mixtures -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source, fragment", [
    ("0.7·d_q + 0.7·d_data", "sum to 1, but they sum to 7/5"),
    ("1.5·d_q + (-0.5)·d_data", "must lie in [0, 1]"),
    ("a(progress)·d_q + (1 - a(progress))·d_data", "for progress > 0.666667"),
    ("c(t)·d_q + (1 - c(t))·d_data", "constants or schedules"),
    ("b(epoch)·d_q + 0.5·d_data", "sum to 1"),
])
def test_mixture_probabilities_checked(source, fragment):
    defs = "a(progress) = 1.5·progress\nb(epoch) = 0.5 + epoch/10\nc(t) = 0.5 + t/1000\n"
    diagnostic = [d for d in errors(f"{defs}objective = E[w ~ {source}] KL(o ‖ q)") if d.code in ("KD141", "KD124")][0]
    assert fragment in diagnostic.message


def test_mixture_schedule_proved():
    load("φ(epoch) = 0.5·(1 + cos(π·epoch))\nobjective = E[w ~ φ(epoch)·d_q + (1 - φ(epoch))·d_data] KL(o ‖ q)")


def test_bounded_mixture_schedules_proved():
    load("a(step) = sin(step)^2\nobjective = E[w ~ a(step)·d_q + (1 - a(step))·d_data] KL(o ‖ q)")
    load("a(step) = step^2 / (1 + step^2)\nobjective = E[w ~ a(step)·d_q + (1 - a(step))·d_data] KL(o ‖ q)")


def test_unprovable_mixture_rejected():
    text = "a(progress) = 4·progress·(1 - progress)\nobjective = E[w ~ a(progress)·d_q + (1 - a(progress))·d_data] KL(o ‖ q)"
    diagnostic = one_error(text, "KD141")
    assert "could not prove" in diagnostic.message
    assert "clip" in diagnostic.hint


def test_distribution_mixture_checked():
    diagnostic = one_error("KL(o ‖ 0.6·o + 0.6·q)", "KD141")
    assert "coefficients must sum to 1" in diagnostic.message


# --- weights ----------------------------------------------------------------------------------------------


def test_token_weight_negative_region():
    text = "sgo.max_new_tokens = 200\ng(t) = 1 - t/100\nobjective = E[w ~ d_q] g(t)·KL(o ‖ q)"
    diagnostic = one_error(text, "KD143")
    assert "negative for t > 100" in diagnostic.message
    assert "200" in diagnostic.hint


def test_token_weight_within_length_accepted():
    load("g(t) = 1 - t/100\nobjective = E[w ~ d_q] g(t)·KL(o ‖ q)")


def test_token_weight_negative_in_probability():
    diagnostic = one_error("g(t, w) = 1 - 2·o(w_t)\nobjective = g(t, w)·KL(o ‖ q)", "KD143")
    assert "o(w_t) =" in diagnostic.message


def test_negative_term_weight_rejected():
    diagnostic = one_error("2·KL(o ‖ q) - CE", "KD143")
    assert "CE is -1" in diagnostic.message


def test_entropy_bonus_allowed():
    (_, bonus) = load("KL(o ‖ q) - 0.1·H(q)").terms
    assert bonus.coefficient.expr == sympy.Rational(-1, 10)


def test_unprovable_weight_warns():
    assert "KD144" in warning_codes("g(t) = exp(t/64) - t/64 - 1\nobjective = g(t)·KL(o ‖ q)")


def test_temperature_must_be_positive():
    one_error("KL(o[τ=0] ‖ q)", "KD140")
    one_error("τ(epoch) = 1 - epoch\nobjective = KL(o[τ=τ(epoch)] ‖ q)", "KD140")


# --- f-divergence generators ------------------------------------------------------------------------------


def test_generator_f_of_one():
    diagnostic = one_error("f(x) = x^2\nobjective = Df[f](o ‖ q)", "KD139")
    assert "f(1) = 1" in diagnostic.message


def test_generator_convexity():
    diagnostic = one_error("f(x) = sqrt(x) - 1\nobjective = Df[f](o ‖ q)", "KD139")
    assert "not convex" in diagnostic.message


@pytest.mark.parametrize("body", ["x·log(x)", "-log(x)", "(x - 1)^2", "abs(x - 1) / 2", "(sqrt(x) - 1)^2"])
def test_known_generators_accepted(body):
    load(f"f(x) = {body}\nobjective = Df[f](o ‖ q)")


def test_generator_must_be_a_function():
    one_error("Df[KL](o ‖ q)", "KD139")


# --- CE and JS endpoints -----------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["d_q", "0.5·d_q + 0.5·d_data", "adaptive(d_q, d_data)"])
def test_ce_needs_labels(source):
    diagnostic = one_error(f"E[w ~ {source}] CE", "KD142")
    assert "d_data" in diagnostic.hint


def test_ce_under_teacher_samples():
    load("E[w ~ d_o] CE")


@pytest.mark.parametrize("param", ["1.5", "-0.1"])
def test_beta_range(param):
    diagnostic = one_error(f"JS[{param}](o ‖ q)", "KD137")
    assert "[0, 1]" in diagnostic.message


def test_js_endpoint_warns_by_default():
    objective = load("JS[0](o ‖ q)")
    (warning,) = objective.warnings
    assert warning.code == "KD138"
    assert "KL(o ‖ q)" in warning.message


def test_js_endpoint_error_policy():
    diagnostic = one_error('js.endpoint = "error"\nobjective = JS[1](o ‖ q)', "KD138")
    assert "KL(q ‖ o)" in diagnostic.hint


def test_js_schedule_reaching_endpoint():
    objective = load("b(progress) = progress\nobjective = JS[b(progress)](o ‖ q)")
    assert [w.code for w in objective.warnings] == ["KD138"]
    assert "progress = 0" in objective.warnings[0].message


def test_skl_alpha_one_warns():
    assert warning_codes("SKL[1](o ‖ q)") == ["KD138"]


# --- warnings -------------------------------------------------------------------------------------------------


def test_unused_settings_warn():
    codes = warning_codes("sgo.max_new_tokens = 32\nrho.clip = 2\nobjective = KL(o ‖ q)")
    assert codes == ["KD153", "KD153"]


def test_used_settings_do_not_warn():
    assert warning_codes("sgo.max_new_tokens = 32\nobjective = E[w ~ d_q] KL(o ‖ q)") == []


def test_term_without_student_warns():
    objective = load("KL(o ‖ q) + H(o)")
    assert [w.code for w in objective.warnings] == ["KD151"]
    assert "H(o)" in objective.warnings[0].message


def test_scale_difference_warns():
    objective = load("KL(o ‖ q) + 1e-5·CE")
    (warning,) = objective.warnings
    assert warning.code == "KD152"
    assert "1e+05" in warning.message


def test_scale_difference_with_schedule():
    assert "KD152" in warning_codes("s(epoch) = 1e-4·(1 + epoch)\nobjective = KL(o ‖ q) + s(epoch)·CE")


def test_zero_weight_warns():
    assert warning_codes("KL(o ‖ q) + 0·CE") == ["KD155"]


def test_unused_definition_warns():
    assert warning_codes("λ = 0.5\nobjective = CE") == ["KD154"]


# --- many errors at once ------------------------------------------------------------------------------------------


def test_errors_reported_together_sorted():
    text = "train.lrr = 1\nx = KLL(o ‖ q)\nobjective = E[w ~ d_qq] KL(o ‖ qq) + 1e-3·CE"
    with pytest.raises(SpecError) as caught:
        load(text)
    positions = [(d.span.line, d.span.column) for d in caught.value.diagnostics]
    assert positions == sorted(positions)
    assert [d.code for d in caught.value.diagnostics if d.severity == "error"] == ["KD102", "KD101", "KD101", "KD101"]
    assert caught.value.render().endswith("4 errors in spec")


# --- canonical hash --------------------------------------------------------------------------------------------------


EQUIVALENT = [
    ("objective = E[w ~ λ·d_q + (1 − λ)·d_data] β·JS[β](o ‖ q)\nλ = 0.5\nβ = 0.5",
     "lambda = 0.5\nbeta = 0.5\nobjective = E[w ~ lambda*d_q + (1 - lambda)*d_data] beta*JS[beta](o || q)"),
    ("objective = KL(o ‖ q) + CE", "objective = CE + KL(o || q)"),
    ("objective = 2·KL(o ‖ q)", "objective = KL(o ‖ q)·2"),
    ("objective = 2·KL(o ‖ q)", "objective = KL(o ‖ q) + KL(o ‖ q)"),
    ("objective = SKL[0.1](o ‖ q)", "objective = KL(o ‖ 0.1·o + 0.9·q)"),
    ("objective = KL(o ‖ 0.1·o + 0.9·q)", "objective = KL(o ‖ 0.9·q + 0.1·o)"),
    ("objective = E[w ~ 0.3·d_q + 0.7·d_data] KL(o ‖ q)·0 + E[w ~ d_o] TV(o, q)", "objective = E[w ~ d_o] TV(q, o)"),
    ("λ(t, w) = exp(-t/256)\nobjective = λ(t, w)·KL(o ‖ q)", "ℓ(t) = exp(-t/256)\nobjective = KL(o ‖ q)·ℓ(t)"),
    ("objective = KL(o[τ=1] ‖ q)", "objective = KL(o ‖ q)"),
    ("objective = JS[0.5](o ‖ q)", "objective = 0.5·KL(o ‖ 0.5·o + 0.5·q) + 0.5·KL(q ‖ 0.5·o + 0.5·q)"),
]

DIFFERENT = [
    ("objective = KL(o ‖ q)", "objective = KL(q ‖ o)"),
    ("objective = KL(o ‖ q)", "objective = 2·KL(o ‖ q)"),
    ("objective = KL(o ‖ q)", "objective = E[w ~ d_q] KL(o ‖ q)"),
    ("objective = KL(o ‖ q)", 'reduction = "sequence"\nobjective = KL(o ‖ q)'),
    ("objective = JS[0.5](o ‖ q)", "objective = JS[0.4](o ‖ q)"),
    ("objective = KL(o[τ=2] ‖ q)", "objective = KL(o ‖ q)"),
    ("objective = E[w ~ 0.5·d_q + 0.5·d_data] KL(o ‖ q)", 'mixture.per = "sequence"\nobjective = E[w ~ 0.5·d_q + 0.5·d_data] KL(o ‖ q)'),
    ("λ(t) = exp(-t/256)\nobjective = λ(t)·KL(o ‖ q)", "λ(t) = exp(-t/128)\nobjective = λ(t)·KL(o ‖ q)"),
    ("f(x) = x·log(x)\nobjective = Df[f](o ‖ q)", "f(x) = -log(x)\nobjective = Df[f](o ‖ q)"),
    ("objective = E[w ~ d_q] KL(o ‖ q)", "sgo.temperature = 0.7\nobjective = E[w ~ d_q] KL(o ‖ q)"),
]


@pytest.mark.parametrize("first, second", EQUIVALENT)
def test_hash_same_for_equivalent_spellings(first, second):
    digest = canonical_hash(kdsl.load(first))
    assert len(digest) == 64
    assert int(digest, 16) >= 0
    assert digest == canonical_hash(kdsl.load(second))


@pytest.mark.parametrize("first, second", DIFFERENT)
def test_hash_differs_when_meaning_differs(first, second):
    assert canonical_hash(kdsl.load(first)) != canonical_hash(kdsl.load(second))


# --- kdsl check output -------------------------------------------------------------------------------------------------


def test_format_objective_sections():
    text = format_objective(kdsl.load("specs/wsgo.kd"))
    assert text.splitlines()[0].startswith("objective  (reduction: token")
    assert "E[w ~ 1/2·d_q + 1/2·d_data]  λ(t, w) · KL(o ‖ q)" in text
    assert "+ E[w ~ d_data]" in text
    assert "φ(epoch) · CE" in text
    assert "λ(t, w) = (1 - o(w_t))·exp(-t/256)" in text
    assert "responses generated by the student" in text
    assert "group 0: student logits, teacher logits" in text
    assert "KL(o‖q)  group 0" in text


# --- the language reference -------------------------------------------------------------------------------------------


def reference_examples() -> list[str]:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "language.md").read_text(encoding="utf-8")
    return [block.split("```")[0] for block in text.split("```kd\n")[1:]]


def test_reference_has_examples():
    assert len(reference_examples()) >= 12


@pytest.mark.parametrize("index", range(len(reference_examples())))
def test_reference_example_is_valid(index):
    objective = kdsl.load(reference_examples()[index])
    assert objective.terms


# --- end to end through the compiled module ---------------------------------------------------------------------------


def test_sum_weight_end_to_end():
    import torch

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    labels[0, :2] = -100  # a 2-token prompt: row 0 has T = 3, row 1 has T = 5
    module = kdsl.compile("n(T) = Σ(exp(-t / 8))\nobjective = n(T) · KL(o ‖ q)")
    loss = module(student_logits=student, teacher_logits=teacher, labels=labels).loss

    log_o, log_q = teacher.log_softmax(-1), student.log_softmax(-1)
    kl = (log_o.exp() * (log_o - log_q)).sum(-1)
    valid = labels != -100
    lengths = valid.sum(-1, keepdim=True).expand_as(kl)
    weight = torch.tensor([[sum(math.exp(-t / 8) for t in range(1, int(n) + 1)) for n in row] for row in lengths])
    expected = (weight * kl)[valid].mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_format_sequence_ratio_power():
    text = format_objective(kdsl.load('ref = "builtin:tiny-teacher"\nρ(T, w) = (ref(w) / q(w))^(1/T)\nobjective = ρ(T, w) · CE'))
    assert "ρ(T, w) = (ref(w)/q(w))^(1/T)" in text
    assert "ρ(T, w) · CE" in text
