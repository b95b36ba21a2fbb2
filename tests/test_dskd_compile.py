"""DSKD's Dual-Space KD criteria written as kdsl specs, compiled with `kdsl.compile`, against DSKD's own vectors.

Each `dskd_full_*` case with a projection stores the inputs of one DSKD
criterion call, its loss, logged values and gradients. The spec text of each
case is the kdsl spelling of that criterion. The compiled objective owns the
projector, and its weights load from the case file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kdsl
from kdsl.errors import KdslError
from kdsl.projected import ProjectedObjective
from kdsl.projection import DualSpaceProjector
from tests.peer_vectors import vectors_dir

VECTORS = vectors_dir()
RTOL, ATOL = 1e-5, 1e-6

HEADER = 'projection.compat = "dskd"\n'
CROSS = HEADER + "projection.accuracy_gate = true\n"
ALIGNED = HEADER + 'projection.attention = "aligned"\n'

# The kdsl spec of each DSKD criterion call, and its kd_rate r.
SPECS = {
    "dskd_full_cma_fkl_S7_T7_Vs11_Vt257": (
        CROSS + "objective = 0.1·CE + 0.9·(CE(o→q) + KL(o→q ‖ q) + KL(o ‖ q→o))", 0.9),
    "dskd_full_cma_fkl_S7_T9_Vs11_Vt13": (
        CROSS + "objective = 0.5·CE + 0.5·(CE(o→q) + KL(o→q ‖ q) + KL(o ‖ q→o))", 0.5),
    "dskd_full_cma_rkl_S7_T9_Vs11_Vt13_T2": (
        CROSS + "objective = 0.5·CE + 0.5·(CE(o→q) + KL(q[τ=2] ‖ o→q[τ=2]) + KL(o[τ=2] ‖ q→o[τ=2]))", 0.5),
    "dskd_full_dual_space_kd_fkl_sameV": (
        ALIGNED + "objective = 0.5·CE + 0.5·(CE(o→q) + KL(o→q ‖ q) + KL(o ‖ q→o))", 0.5),
}

pytestmark = pytest.mark.skipif(
    not all((VECTORS / f"{name}.json").exists() for name in SPECS), reason=f"no dskd_full_* reference vectors under {VECTORS}"
)


def load_case(name: str):
    from safetensors.torch import load_file

    meta = json.loads((VECTORS / f"{name}.json").read_text())
    inputs = load_file(VECTORS / meta["inputs_file"])
    outputs = load_file(VECTORS / meta["outputs_file"])
    teacher_type = meta["call"]["distiller"]["teacher_model_type"]
    return meta, inputs, outputs, teacher_type


def compile_case(name: str, inputs: dict, meta: dict):
    spec, _ = SPECS[name]
    cross = "aligned" not in spec
    projector = DualSpaceProjector(
        inputs["student_hidden"].shape[-1], inputs["teacher_hidden"].shape[-1],
        cross_attention=cross, compat="dskd", accuracy_gate=cross,
    )
    projector.load_pretrained(VECTORS / meta["inputs_file"], strict=False)
    return kdsl.compile(spec, projector=projector)


def call_case(compiled, inputs: dict, teacher_type: str, student_hidden, student_head):
    return compiled(
        labels=inputs["label"],
        teacher_labels=inputs[f"teacher_{teacher_type}_label"],
        student_hidden=student_hidden,
        student_head=student_head,
        teacher_hidden=inputs["teacher_hidden"],
        teacher_head=inputs["teacher_lm_head"],
        student_input_ids=inputs["input_ids"],
        teacher_input_ids=inputs[f"teacher_{teacher_type}_input_ids"],
        student_embedding=inputs["student_embed"],
        teacher_embedding=inputs["teacher_embed"],
    )


@pytest.mark.parametrize("name", sorted(SPECS))
def test_compiled_dskd_matches(name):
    meta, inputs, outputs, teacher_type = load_case(name)
    compiled = compile_case(name, inputs, meta)
    assert isinstance(compiled, ProjectedObjective)
    hidden = inputs["student_hidden"].clone().requires_grad_(True)
    head = inputs["student_lm_head"].clone().requires_grad_(True)

    result = call_case(compiled, inputs, teacher_type, hidden, head)
    torch.testing.assert_close(result.loss.detach(), outputs["loss"], rtol=RTOL, atol=ATOL)

    _, rate = SPECS[name]
    torch.testing.assert_close(result.terms["CE"].double(), (1 - rate) * outputs["log_nll_loss"].double(), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(result.terms["CE(o→q)"].double(), rate * outputs["log_t2s_ce_loss"].double(), rtol=RTOL, atol=ATOL)

    named = {"student_hidden": hidden, "student_lm_head": head}
    for parameter_name, parameter in compiled.projector.named_parameters():
        projector_name, _, kind = parameter_name.partition(".0.")
        named[f"proj_{projector_name}_{kind}"] = parameter
    recorded = sorted(key[len("grad_"):] for key in outputs if key.startswith("grad_") and not key.endswith("_is_none"))
    assert recorded and set(recorded) <= set(named)
    grads = torch.autograd.grad(result.loss, [named[key] for key in recorded], allow_unused=True)
    for key, grad in zip(recorded, grads):
        assert grad is not None, f"{key} got no gradient"
        torch.testing.assert_close(grad, outputs[f"grad_{key}"], rtol=RTOL, atol=ATOL, msg=lambda m, k=key: f"grad_{k}: {m}")


def test_projector_is_a_submodule():
    compiled = kdsl.compile("objective = CE + CE(o→q) + KL(o ‖ q→o)", hidden_sizes=(4, 6))
    names = {name for name, _ in compiled.named_parameters()}
    assert {"projector.t2s.0.weight", "projector.s2t.0.weight", "projector.query.0.weight"} <= names
    state = compiled.state_dict()
    assert "projector.t2s.0.weight" in state
    restored = kdsl.compile("objective = CE + CE(o→q) + KL(o ‖ q→o)", hidden_sizes=(4, 6))
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.projector.t2s[0].weight, compiled.projector.t2s[0].weight)


def test_projection_runs_once_per_call(monkeypatch):
    compiled = kdsl.compile("objective = CE(o→q) + KL(o→q[τ=2] ‖ q[τ=2]) + KL(o ‖ q→o)", hidden_sizes=(4, 6))
    calls = []
    original = DualSpaceProjector.forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DualSpaceProjector, "forward", counting)
    generator = torch.Generator().manual_seed(0)
    batch, student_length, teacher_length = 2, 5, 6
    labels = torch.randint(0, 7, (batch, student_length), generator=generator)
    labels[0, 0] = -100
    teacher_labels = torch.randint(0, 9, (batch, teacher_length), generator=generator)
    result = compiled(
        labels=labels, teacher_labels=teacher_labels,
        student_hidden=torch.randn(batch, student_length, 4, generator=generator, requires_grad=True),
        student_head=torch.randn(7, 4, generator=generator),
        teacher_hidden=torch.randn(batch, teacher_length, 6, generator=generator),
        teacher_head=torch.randn(9, 6, generator=generator),
        student_input_ids=torch.randint(0, 7, (batch, student_length), generator=generator),
        teacher_input_ids=torch.randint(0, 9, (batch, teacher_length), generator=generator),
        student_embedding=torch.randn(7, 4, generator=generator),
        teacher_embedding=torch.randn(9, 6, generator=generator),
    )
    assert calls == [1]
    assert set(result.terms) == {"CE(o→q)", "KL(o→q[τ=2]‖q[τ=2])", "KL(o‖q→o)"}
    assert torch.isfinite(result.loss)


def test_missing_projection_input_named():
    compiled = kdsl.compile("objective = CE(o→q)", hidden_sizes=(4, 6))
    labels = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(KdslError, match="teacher_labels"):
        compiled(labels=labels, student_hidden=torch.randn(1, 3, 4), teacher_hidden=torch.randn(1, 4, 6),
                 student_head=torch.randn(5, 4))


def test_projector_required_at_compile():
    with pytest.raises(KdslError, match="hidden_sizes"):
        kdsl.compile("objective = CE(o→q)")


def test_projector_settings_must_match():
    projector = DualSpaceProjector(4, 6, compat="masked")
    with pytest.raises(KdslError, match="projection.compat"):
        kdsl.compile('projection.compat = "dskd"\nobjective = CE(o→q)', projector=projector)


def test_trainer_compile_needs_models():
    from kdsl.errors import ConfigError
    from kdsl.train import compile_objective

    objective = kdsl.load(str(Path(__file__).resolve().parents[1] / "specs" / "dskd.kd"))
    with pytest.raises(ConfigError, match=r"compile_objective\(objective, student, teacher\)"):
        compile_objective(objective)


# --- Token weights and schedules on projected terms ------------------------------------

CASE = "dskd_full_cma_fkl_S7_T9_Vs11_Vt13"


def compile_with(spec: str, inputs: dict, meta: dict):
    projector = DualSpaceProjector(inputs["student_hidden"].shape[-1], inputs["teacher_hidden"].shape[-1],
                                   compat="dskd", accuracy_gate=False)
    projector.load_pretrained(VECTORS / meta["inputs_file"], strict=False)
    return kdsl.compile(HEADER + spec, projector=projector, same_vocab=False)


def test_schedule_on_projected_term():
    meta, inputs, _, teacher_type = load_case(CASE)
    hidden, head = inputs["student_hidden"], inputs["student_lm_head"]
    plain = call_case(compile_with("objective = CE + KL(o ‖ q→o)", inputs, meta), inputs, teacher_type, hidden, head)
    scheduled = compile_with("φ(epoch) = 0.5·(1 + cos(π·epoch/4))\nobjective = CE + φ(epoch)·KL(o ‖ q→o)", inputs, meta)
    for epoch in (0.0, 1.0, 2.0, 4.0):
        phi = 0.5 * (1 + torch.cos(torch.tensor(torch.pi * epoch / 4))).item()
        result = scheduled(
            labels=inputs["label"], teacher_labels=inputs[f"teacher_{teacher_type}_label"],
            student_hidden=hidden, student_head=head, teacher_hidden=inputs["teacher_hidden"],
            teacher_head=inputs["teacher_lm_head"], student_input_ids=inputs["input_ids"],
            teacher_input_ids=inputs[f"teacher_{teacher_type}_input_ids"],
            student_embedding=inputs["student_embed"], teacher_embedding=inputs["teacher_embed"], epoch=epoch,
        )
        torch.testing.assert_close(result.terms["KL(o‖q→o)"], phi * plain.terms["KL(o‖q→o)"], rtol=1e-6, atol=1e-7)


def test_token_weight_counts_teacher_positions():
    from kdsl import numerics

    meta, inputs, _, teacher_type = load_case(CASE)
    compiled = compile_with("λ(t, w) = exp(-t/4)·(1 - o(w_t))\nobjective = CE + λ(t, w)·KL(o ‖ q→o)", inputs, meta)
    teacher_labels = inputs[f"teacher_{teacher_type}_label"]
    result = call_case(compiled, inputs, teacher_type, inputs["student_hidden"], inputs["student_lm_head"])

    # By hand: project, take the KL at each teacher position, weigh it with t counted over the teacher's scored tokens.
    projection = compiled.projector(
        inputs["student_hidden"], inputs["teacher_hidden"], student_input_ids=inputs["input_ids"],
        student_labels=inputs["label"], teacher_input_ids=inputs[f"teacher_{teacher_type}_input_ids"],
        teacher_labels=teacher_labels, student_embedding=inputs["student_embed"],
        teacher_embedding=inputs["teacher_embed"], student_head=inputs["student_lm_head"],
        teacher_head=inputs["teacher_lm_head"],
    )
    teacher_logits = inputs["teacher_hidden"].float() @ inputs["teacher_lm_head"].float().T
    log_o = torch.log_softmax(teacher_logits, dim=-1)
    kl = numerics.kl(log_o, torch.log_softmax(projection.q_to_o, dim=-1))
    valid = teacher_labels.ne(-100)
    t = valid.cumsum(dim=1).float()
    o_label = log_o.gather(-1, teacher_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1).exp()
    weight = torch.exp(-t / 4) * (1 - o_label)
    expected = (weight * kl)[valid].sum() / inputs["label"].ne(-100).sum()
    torch.testing.assert_close(result.terms["KL(o‖q→o)"], expected, rtol=1e-5, atol=1e-6)


def test_weight_across_vocabularies_rejected():
    meta, inputs, _, teacher_type = load_case(CASE)
    compiled = compile_with("λ(t, w) = 1 - o(w_t)\nobjective = CE(o→q) + λ(t, w)·KL(o→q ‖ q)", inputs, meta)
    with pytest.raises(KdslError, match=r"reads o\(w_t\) at the student's positions"):
        call_case(compiled, inputs, teacher_type, inputs["student_hidden"], inputs["student_lm_head"])


def test_sequence_weight_on_projected_terms():
    """ρ(w) reads each model's log-probability of the row's text in its own tokens, and weighs both sides' terms."""
    meta, inputs, _, teacher_type = load_case(CASE)
    teacher_labels = inputs[f"teacher_{teacher_type}_label"]
    compiled = compile_with('rho.clip = 3\nρ(T, w) = (o(w) / q(w))^(1/T)\n'
                            "objective = CE + ρ(T, w)·KL(o ‖ q→o) + ρ(T, w)·KL(o→q ‖ q)", inputs, meta)
    plain = compile_with("objective = CE + KL(o ‖ q→o) + KL(o→q ‖ q)", inputs, meta)
    result = call_case(compiled, inputs, teacher_type, inputs["student_hidden"], inputs["student_lm_head"])
    reference = call_case(plain, inputs, teacher_type, inputs["student_hidden"], inputs["student_lm_head"])

    # By hand, in float64: each side's log-probability of its own labels, summed over its scored tokens.
    labels = inputs["label"]
    student_logits = inputs["student_hidden"].double() @ inputs["student_lm_head"].double().T
    teacher_logits = inputs["teacher_hidden"].double() @ inputs["teacher_lm_head"].double().T
    def sequence_logp(logits, row_labels):
        logp = torch.log_softmax(logits, dim=-1).gather(-1, row_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return torch.where(row_labels.ne(-100), logp, 0.0).sum(dim=1)
    length = labels.ne(-100).sum(dim=1).double()
    unclipped = torch.exp((sequence_logp(teacher_logits, teacher_labels) - sequence_logp(student_logits, labels)) / length)
    applied = unclipped.clamp(max=3.0)
    assert set(result.terms) == {"CE", "KL(o‖q→o)", "KL(o→q‖q)"}  # a term's name leaves its weight out
    for name in ("KL(o‖q→o)", "KL(o→q‖q)"):
        weights = result.sequence_weights[name]
        torch.testing.assert_close(weights.unclipped, unclipped, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(weights.applied.double(), applied, rtol=1e-5, atol=1e-8)
        assert weights.clip == 3.0

    # Each row's KL terms scale by its weight: with one row at a time the ratio to the plain term is the weight.
    for row in range(labels.shape[0]):
        def one_row(tensor):
            return tensor[row : row + 1]
        single = {key: one_row(value) if key in ("label", "student_hidden", "teacher_hidden", "input_ids",
                                                 f"teacher_{teacher_type}_label", f"teacher_{teacher_type}_input_ids")
                  else value for key, value in inputs.items()}
        weighted = call_case(compiled, single, teacher_type, single["student_hidden"], single["student_lm_head"])
        base = call_case(plain, single, teacher_type, single["student_hidden"], single["student_lm_head"])
        for name in ("KL(o‖q→o)", "KL(o→q‖q)"):
            torch.testing.assert_close(weighted.terms[name].double(), applied[row] * base.terms[name].double(),
                                       rtol=1e-4, atol=1e-7)
    assert set(reference.sequence_weights) == set()

def test_sequence_weight_keeps_later_gradients():
    """A ρ(w) that reads q(w) must not cut the gradient of a later term that reads q."""
    meta, inputs, _, teacher_type = load_case(CASE)

    def gradient(spec: str) -> torch.Tensor:
        torch.manual_seed(0)
        hidden = inputs["student_hidden"].clone().requires_grad_(True)
        result = call_case(compile_with(spec, inputs, meta), inputs, teacher_type, hidden, inputs["student_lm_head"])
        result.loss.backward()
        return hidden.grad

    weighted = "ρ(T, w) = (o(w) / q(w))^(1/T)\nobjective = ρ(T, w)·KL(o ‖ q→o)"
    together = gradient(weighted + " + KL(o→q ‖ q)")
    apart = gradient(weighted) + gradient("objective = KL(o→q ‖ q)")
    torch.testing.assert_close(together, apart, rtol=1e-5, atol=1e-7)
