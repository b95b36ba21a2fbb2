"""The language of cross-vocabulary projection: o→q and q→o, CE(o→q), a temperature on a projection and its settings."""

from __future__ import annotations

import pytest
import sympy

import kdsl
from kdsl import objective as obj
from kdsl.check import canonical_hash, format_objective
from kdsl.errors import SpecError


def load(text: str, **kwargs) -> obj.Objective:
    return kdsl.load(text if "objective" in text else f"objective = {text}", **kwargs)


def one_error(text: str, code: str, **kwargs):
    with pytest.raises(SpecError) as caught:
        load(text, **kwargs)
    found = [d for d in caught.value.diagnostics if d.severity == "error"]
    assert [d.code for d in found] == [code], [d.render() for d in found]
    return found[0]


def test_projections_are_typed_distributions():
    (forward,) = load("KL(o→q ‖ q)").terms
    (reverse,) = load("KL(o ‖ q→o)").terms
    assert forward.loss.args[0] == obj.ProjectedDist("o")
    assert forward.loss.args[0].vocab == "student"
    assert reverse.loss.args[1] == obj.ProjectedDist("q")
    assert reverse.loss.args[1].vocab == "teacher"


def test_projection_vocabulary_mismatch_rejected():
    error = one_error("KL(o→q[τ=2] ‖ o)", "KD130", same_vocab=False)
    assert "o→q[τ=2]" in error.message


def test_projections_accepted_across_vocabularies():
    objective = load("CE(o→q) + KL(o→q[τ=2] ‖ q) + KL(o ‖ q→o)", same_vocab=False)
    assert len(objective.terms) == 3


def test_cross_entropy_of_projection():
    (term,) = load("CE(o→q)").terms
    assert term.loss.kind == "CE"
    assert term.loss.args == (obj.ProjectedDist("o"),)
    assert term.name == "CE(o→q)"


def test_cross_entropy_differs_from_plain():
    plain = load("CE")
    projected = load("CE(o→q)")
    assert plain.terms[0].loss.args == ()
    assert canonical_hash(plain) != canonical_hash(projected)


@pytest.mark.parametrize("text", ["CE(q)", "CE(o)", "CE(q→o)", "CE(0.5·o→q + 0.5·q)", "CE(2)"])
def test_cross_entropy_rejects_other_arguments(text):
    error = one_error(text, "KD122")
    assert "CE(o→q)" in error.hint


def test_cross_entropy_takes_one_argument():
    error = one_error("CE(o→q, o→q)", "KD122")
    assert "2 arguments" in error.message


def test_cross_entropy_in_definition_rejected():
    one_error("f(t) = CE(o→q)\nobjective = f(1)", "KD121")


@pytest.mark.parametrize("text", ["KL(o→q[τ=2] ‖ q[τ=2])", "KL((o→q)[τ=2] ‖ q[τ=2])", "KL(o->q[tau=2] ‖ q[τ=2])"])
def test_projection_temperature_spellings(text):
    (term,) = load(text).terms
    projected = term.loss.args[0]
    assert isinstance(projected, obj.ProjectedDist)
    assert projected.temperature.expr == 2
    assert term.name == "KL(o→q[τ=2]‖q[τ=2])"


def test_projection_temperature_changes_hash():
    assert canonical_hash(load("KL(o→q[τ=2] ‖ q)")) != canonical_hash(load("KL(o→q ‖ q)"))
    assert canonical_hash(load("KL(o→q[τ=1] ‖ q)")) == canonical_hash(load("KL(o→q ‖ q)"))


def test_projection_temperature_schedule():
    (term,) = load("KL(o ‖ q→o[τ=1 + progress])").terms
    assert term.loss.args[1].temperature.expr == 1 + obj.PROGRESS


@pytest.mark.parametrize("option", ["τ=0", "τ=-1"])
def test_projection_temperature_positive(option):
    one_error(f"KL(o→q[{option}] ‖ q)", "KD140")


def test_projection_rejects_top_k():
    error = one_error("KL(o→q[top_k=4] ‖ q)", "KD132")
    assert "o→q[τ=2]" in error.hint


def test_projection_rejects_repeated_temperature():
    one_error("KL(o→q[τ=2, τ=3] ‖ q)", "KD132")


def test_projection_settings_defaults():
    objective = load("KL(o→q ‖ q)")
    assert objective.settings["projection.accuracy_gate"] is False
    assert objective.settings["projection.attention"] == "cross"
    assert objective.settings["projection.alignment"] == "learned"


def test_projection_settings_set():
    objective = load('projection.accuracy_gate = true\nprojection.attention = "aligned"\nobjective = KL(o→q ‖ q)')
    assert objective.settings["projection.accuracy_gate"] is True
    assert objective.settings["projection.attention"] == "aligned"


def test_projection_attention_invalid_choice():
    with pytest.raises(SpecError) as caught:
        load('projection.attention = "full"\nobjective = KL(o→q ‖ q)')
    assert "cross" in caught.value.render()


def test_dskd_recipe_prints_as_written():
    objective = load(
        'projection.compat = "dskd"\nprojection.accuracy_gate = true\nr = 0.9\n'
        "objective = (1 - r)·CE + r·(CE(o→q) + KL(o→q[τ=2] ‖ q[τ=2]) + KL(o[τ=2] ‖ q→o[τ=2]))"
    )
    assert [term.name for term in objective.terms] == ["CE", "CE(o→q)", "KL(o→q[τ=2]‖q[τ=2])", "KL(o[τ=2]‖q→o[τ=2])"]
    assert [term.coefficient.expr for term in objective.terms] == [sympy.Rational(1, 10)] + [sympy.Rational(9, 10)] * 3
    assert "CE(o→q)" in format_objective(objective)


@pytest.mark.parametrize("setting", ["projection.accuracy_gate = true", 'projection.attention = "aligned"', 'projection.compat = "dskd"',
                                     'projection.alignment = "text"'])
def test_projection_settings_change_hash(setting):
    plain = load("KL(o→q ‖ q)")
    changed = load(f"{setting}\nobjective = KL(o→q ‖ q)")
    assert canonical_hash(plain) != canonical_hash(changed)


def test_text_alignment_reaches_the_projector_and_needs_ends():
    import torch

    from kdsl.errors import KdslError

    compiled = kdsl.compile('projection.alignment = "text"\nobjective = CE + KL(o ‖ q→o)', hidden_sizes=(4, 6),
                            same_vocab=False)
    assert compiled.projector.alignment == "text"
    g = torch.Generator().manual_seed(0)
    arguments = dict(
        labels=torch.tensor([[-100, 1, 2]]), teacher_labels=torch.tensor([[-100, 3, 4, 5]]),
        student_hidden=torch.randn(1, 3, 4, generator=g), teacher_hidden=torch.randn(1, 4, 6, generator=g),
        student_input_ids=torch.tensor([[0, 1, 2]]), teacher_input_ids=torch.tensor([[0, 3, 4, 5]]),
        student_embedding=torch.randn(5, 4, generator=g), teacher_embedding=torch.randn(7, 6, generator=g),
        student_head=torch.randn(5, 4, generator=g), teacher_head=torch.randn(7, 6, generator=g),
    )
    with pytest.raises(KdslError, match="needs student_ends"):
        compiled(**arguments)
    result = compiled(**arguments, student_ends=torch.tensor([[0, 3, 5]]), teacher_ends=torch.tensor([[0, 2, 3, 5]]))
    assert torch.isfinite(result.loss)
