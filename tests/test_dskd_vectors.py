"""DSKD's full criteria rebuilt from kdsl pieces and checked against vectors computed with DSKD's own code.

Each `dskd_full_*` case stores the inputs of one criterion call (hidden
states, heads, embeddings, labels, projector weights), the loss, the values
the criterion logs and the gradients. The criteria are composed here from
`kdsl.projection.DualSpaceProjector` (in `compat="dskd"` mode) and the
kernels of `kdsl.numerics`; nothing is copied from DSKD.

DSKD sums every term over valid positions and divides by `batch_denom`, the
number of valid student labels, teacher-side sums included.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdsl import numerics
from kdsl.projection import DualSpaceProjector, projected_accuracy
from tests.peer_vectors import vectors_dir

VECTORS = vectors_dir()
CASES = sorted(path.name[: -len(".json")] for path in VECTORS.glob("dskd_full_*.json"))
RTOL, ATOL = 1e-5, 1e-6

pytestmark = pytest.mark.skipif(not CASES, reason=f"no dskd_full_* reference vectors under {VECTORS}")


# --- Loading a case -------------------------------------------------------------------


def load_case(name: str) -> tuple[dict, dict, dict]:
    from safetensors.torch import load_file

    meta = json.loads((VECTORS / f"{name}.json").read_text())
    inputs = load_file(VECTORS / meta["inputs_file"])
    outputs = load_file(VECTORS / meta["outputs_file"])
    return meta, inputs, outputs


class Options:
    """DSKD's criterion arguments, read from the case's constructor arguments."""

    def __init__(self, args: dict):
        self.kd_rate = args["kd_rate"]
        self.temperature = args["kd_temperature"]
        self.teacher_temperature = args["teacher_temperature"]
        self.objective = args["kd_objective"]
        self.skew_lambda = args["skew_lambda"]
        self.adaptive_alpha = args["adaptive_kl_alpha"]
        self.label_smoothing = args["label_smoothing"]
        self.only_projector = args["only_save_projector"]


# --- DSKD's divergences as kdsl kernels ----------------------------------------------


def divergence(options: Options, student_logits, target_logits, target_temperature_too: bool):
    """DSKD's `kd_objective` per position; the target is the (projected) teacher side."""
    target_temperature = options.temperature
    if target_temperature_too:
        target_temperature = options.temperature * options.teacher_temperature
    logp_s = numerics.log_softmax(student_logits, temperature=options.temperature)
    logp_t = numerics.log_softmax(target_logits, temperature=target_temperature)
    if options.objective == "forward_kl":
        return numerics.kl(logp_t, logp_s)
    if options.objective == "reverse_kl":
        return numerics.kl(logp_s, logp_t)
    if options.objective == "skewed_forward_kl":
        return numerics.skew_kl(logp_t, logp_s, options.skew_lambda)
    if options.objective == "skewed_reverse_kl":
        return numerics.skew_reverse_kl(logp_t, logp_s, options.skew_lambda)
    if options.objective == "js_divergence":
        return numerics.js(logp_t, logp_s, 0.5)
    if options.objective == "adaptive_kl":
        return adaptive_kl(logp_s, logp_t, options.adaptive_alpha)
    raise AssertionError(f"no kdsl composition for kd_objective {options.objective!r}")


def adaptive_kl(logp_s, logp_t, alpha: float):
    """AKL: FKL and RKL weighted by the (detached) gaps on the teacher's head and tail."""
    p_s, p_t = logp_s.exp(), logp_t.exp()
    sorted_t, order = p_t.sort(dim=-1)
    gap = (sorted_t - p_s.gather(-1, order)).abs()
    tail = sorted_t.cumsum(dim=-1).lt(alpha).float()
    g_head = (gap * (1 - tail)).sum(-1).detach()
    g_tail = (gap * tail).sum(-1).detach()
    total = g_head + g_tail
    return g_head / total * numerics.kl(logp_t, logp_s) + g_tail / total * numerics.kl(logp_s, logp_t)


def student_ce(options: Options, logits, labels):
    """DSKD's summed CE; with label smoothing it keeps DSKD's broadcast of the summed NLL."""
    mask = labels.ne(-100)
    nll = numerics.token_nll(numerics.log_softmax(logits), labels).sum()
    if options.label_smoothing <= 0:
        return nll, nll
    eps = options.label_smoothing / (logits.shape[-1] - 1)
    smooth = -numerics.log_softmax(logits).sum(-1)
    return (((1 - options.label_smoothing - eps) * nll + eps * smooth) * mask).sum(), nll


def accuracy(logits, labels):
    return (logits.argmax(-1).eq(labels) & labels.ne(-100)).sum()


# --- The criteria ---------------------------------------------------------------------


class Inputs:
    """The tensors of one case, with the leaves whose gradients DSKD recorded."""

    def __init__(self, meta: dict, inputs: dict):
        teacher_type = meta["call"]["distiller"]["teacher_model_type"]
        self.student_hidden = inputs["student_hidden"].clone().requires_grad_(True)
        self.student_head = inputs["student_lm_head"].clone().requires_grad_(True)
        self.teacher_hidden = inputs["teacher_hidden"]
        self.teacher_head = inputs["teacher_lm_head"]
        self.student_embedding = inputs["student_embed"]
        self.teacher_embedding = inputs["teacher_embed"]
        self.student_ids = inputs["input_ids"]
        self.labels = inputs["label"].clone()
        self.teacher_ids = inputs[f"teacher_{teacher_type}_input_ids"]
        self.teacher_labels = inputs[f"teacher_{teacher_type}_label"].clone()
        self.student_logits = self.student_hidden @ self.student_head.T
        self.teacher_logits = self.teacher_hidden @ self.teacher_head.T
        self.denom = self.labels.ne(-100).sum()


def build_projector(inputs: Inputs, case_file: Path, cross_attention: bool, gate: bool) -> DualSpaceProjector:
    projector = DualSpaceProjector(
        inputs.student_hidden.shape[-1],
        inputs.teacher_hidden.shape[-1],
        cross_attention=cross_attention,
        compat="dskd",
        accuracy_gate=gate,
    )
    ignored = projector.load_pretrained(case_file, strict=False)
    unused = {"proj_query_weight", "proj_query_bias"} if not cross_attention else set()
    assert {key for key in ignored if key.startswith("proj_")} <= unused
    return projector


def cross_model_attention_kd(options: Options, x: Inputs, case_file: Path):
    """DualSpaceKDWithCMA: CE + CE(o→q) + gated D(o→q ‖ q) + KL(o ‖ q→o)."""
    projector = build_projector(x, case_file, cross_attention=True, gate=True)
    ce, nll = student_ce(options, x.student_logits, x.labels)
    projection = projector(
        x.student_hidden,
        x.teacher_hidden,
        student_input_ids=x.student_ids,
        student_labels=x.labels,
        teacher_input_ids=x.teacher_ids,
        teacher_labels=x.teacher_labels,
        student_embedding=x.student_embedding,
        teacher_embedding=x.teacher_embedding,
        student_head=x.student_head,
        teacher_head=None if options.only_projector else x.teacher_head,
    )
    o_to_q = projection.o_to_q
    t2s_ce = numerics.token_nll(numerics.log_softmax(o_to_q), x.labels).sum()
    logs = {
        "nll_loss": nll,
        "t2s_ce_loss": t2s_ce,
        "t2s_acc": projected_accuracy(o_to_q, x.labels).sum(),
        "max_t2s_prob": (o_to_q.softmax(-1).max(-1).values * projection.student_mask).sum(),
    }
    kd = t2s_ce
    if not options.only_projector:
        t2s_kd = (divergence(options, x.student_logits, o_to_q.detach(), True) * projection.kd_mask).sum()
        s2t_kd = s2t_forward_kl(options, x, projection)
        teacher_fraction = projection.student_mask.sum() / projection.teacher_mask.sum()
        logs["t2s_kd_loss"] = t2s_kd
        logs["s2t_kd_loss"] = s2t_kd
        logs["s2t_acc"] = accuracy(projection.q_to_o, x.teacher_labels) * teacher_fraction
        kd = t2s_ce + t2s_kd + s2t_kd
    return finish(options, x, projector, ce, kd, logs)


def s2t_forward_kl(options: Options, x: Inputs, projection) -> torch.Tensor:
    logp_teacher = numerics.log_softmax(x.teacher_logits, temperature=options.temperature)
    logp_projected = numerics.log_softmax(projection.q_to_o, temperature=options.temperature)
    return (numerics.kl(logp_teacher, logp_projected) * projection.teacher_mask).sum()


def dual_space_kd(options: Options, x: Inputs, case_file: Path):
    """DualSpaceKD (one tokenizer): CE + CE(o→q) + D(o→q ‖ q) + KL(o ‖ q→o), position by position."""
    projector = build_projector(x, case_file, cross_attention=False, gate=False)
    ce, nll = student_ce(options, x.student_logits, x.labels)
    projection = projector.project_aligned(
        x.student_hidden,
        x.teacher_hidden,
        student_labels=x.labels,
        teacher_labels=x.teacher_labels,
        student_head=x.student_head,
        teacher_head=x.teacher_head,
    )
    t2s_ce = numerics.token_nll(numerics.log_softmax(projection.o_to_q), x.labels).sum()
    t2s_kd = (divergence(options, x.student_logits, projection.o_to_q.detach(), False) * projection.kd_mask).sum()
    s2t_kd = s2t_forward_kl(options, x, projection)
    teacher_fraction = projection.student_mask.sum() / projection.teacher_mask.sum()
    logs = {
        "nll_loss": nll,
        "t2s_ce_loss": t2s_ce,
        "t2s_kd_loss": t2s_kd,
        "s2t_kd_loss": s2t_kd,
        "t2s_acc": projected_accuracy(projection.o_to_q, x.labels).sum(),
        "s2t_acc": accuracy(projection.q_to_o, x.teacher_labels) * teacher_fraction,
    }
    return finish(options, x, projector, ce, t2s_ce + t2s_kd + s2t_kd, logs)


def various_divergence(options: Options, x: Inputs, case_file: Path):
    """VariousDivergence (one tokenizer): CE + D(o ‖ q)."""
    ce, nll = student_ce(options, x.student_logits, x.labels)
    kd = (divergence(options, x.student_logits, x.teacher_logits, False) * x.labels.ne(-100)).sum()
    return finish(options, x, None, ce, kd, {"nll_loss": nll})


def universal_logit_distillation(options: Options, x: Inputs, case_file: Path):
    """DSKD's ULD: each row shifted so its first valid label is at position 0, then sorted-probability L1."""
    ce, nll = student_ce(options, x.student_logits, x.labels)
    student_logits, labels = roll_to_response(x.student_logits, x.labels)
    teacher_logits, teacher_labels = roll_to_response(x.teacher_logits, x.teacher_labels)
    distance = numerics.uld(numerics.log_softmax(student_logits), numerics.log_softmax(teacher_logits))
    kd = (distance * (labels.ne(-100) & teacher_labels.ne(-100))).sum()
    logs = {"nll_loss": nll, "uld_loss": kd, "accuracy": accuracy(student_logits, labels)}
    return finish(options, x, None, ce, kd, logs)


def roll_to_response(logits, labels):
    rows = []
    label_rows = []
    for row in range(labels.shape[0]):
        start = int(labels[row].ne(-100).nonzero()[0, 0])
        rows.append(torch.roll(logits[row], -start, dims=0))
        label_rows.append(torch.roll(labels[row], -start, dims=0))
    return torch.stack(rows), torch.stack(label_rows)


def finish(options: Options, x: Inputs, projector, ce, kd, logs: dict):
    loss = (1.0 - options.kd_rate) * ce + options.kd_rate * kd
    logs = {"kd_loss": kd, "loss": loss, "accuracy": accuracy(x.student_logits, x.labels), **logs}
    logs = {name: value.detach().double() / x.denom for name, value in logs.items()}
    return loss / x.denom, logs, projector


CRITERIA = {
    "DualSpaceKDWithCMA": cross_model_attention_kd,
    "DualSpaceKD": dual_space_kd,
    "VariousDivergence": various_divergence,
    "UniversalLogitDistillation": universal_logit_distillation,
}


# --- The checks -----------------------------------------------------------------------


def leaves(x: Inputs, projector) -> dict[str, torch.Tensor]:
    named = {"student_hidden": x.student_hidden, "student_lm_head": x.student_head}
    if projector is not None:
        for name, parameter in projector.named_parameters():
            projector_name, _, param = name.partition(".0.")
            named[f"proj_{projector_name}_{param}"] = parameter
    return named


@pytest.mark.parametrize("case", CASES)
def test_dskd_case_matches(case):
    meta, inputs, outputs = load_case(case)
    criterion = meta["call"]["criterion"]
    assert criterion in CRITERIA, f"no kdsl composition for DSKD criterion {criterion}"
    options = Options(meta["call"]["constructor_args"])
    x = Inputs(meta, inputs)
    loss, logs, projector = CRITERIA[criterion](options, x, VECTORS / meta["inputs_file"])

    torch.testing.assert_close(x.student_logits.detach(), outputs["student_logits"], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(loss.detach(), outputs["loss"], rtol=RTOL, atol=ATOL)
    assert float(outputs["batch_denom"]) == float(x.denom)

    expected_logs = {key[len("log_") :] for key in outputs if key.startswith("log_")}
    assert expected_logs <= set(logs), f"logged terms without a kdsl value: {sorted(expected_logs - set(logs))}"
    for name in sorted(expected_logs):
        torch.testing.assert_close(
            logs[name], outputs[f"log_{name}"].double(), rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"log_{n}: {m}"
        )

    named = leaves(x, projector)
    recorded = sorted(key[len("grad_") :] for key in outputs if key.startswith("grad_") and not key.endswith("_is_none"))
    absent = sorted(key[len("grad_") : -len("_is_none")] for key in outputs if key.endswith("_is_none"))
    assert set(recorded) | set(absent) <= set(named), f"gradients of unknown leaves: {set(recorded) | set(absent) - set(named)}"
    checked = recorded + absent
    grads = torch.autograd.grad(loss, [named[name] for name in checked], allow_unused=True)
    for name, grad in zip(checked, grads):
        if name in absent:
            assert grad is None or not grad.any(), f"{name} should get no gradient"
            continue
        assert grad is not None, f"{name} got no gradient"
        torch.testing.assert_close(grad, outputs[f"grad_{name}"], rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"grad_{n}: {m}")


def test_dskd_visible_cases_present():
    expected = {
        "dskd_full_cma_fkl_S7_T7_Vs11_Vt257",
        "dskd_full_cma_fkl_S7_T9_Vs11_Vt13",
        "dskd_full_cma_rkl_S7_T9_Vs11_Vt13_T2",
        "dskd_full_dual_space_kd_fkl_sameV",
        "dskd_full_uld_S7_T7_Vs11_Vt13",
        "dskd_full_various_divergence_fkl",
    }
    assert expected <= set(CASES)
