"""Turn each stored peer reference case into checks: an alias, the inputs kdsl receives, and the peer's numbers.

A case stores the peer's own inputs (logits, log-probabilities,
probabilities or hidden states with an output head). A `Check` rebuilds from
them the student and teacher logits that a kdsl objective receives, keeps
the differentiable inputs as leaves, and converts the peer's gradients into
gradients with respect to those leaves where the peer differentiated
something else (Liger's log-probability and probability inputs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from tests.conformance.aliases import CROSS_PEER, Alias, alias_for_case, liger_chunked_jsd
from tests.peer_vectors import vectors_dir

VECTORS = vectors_dir()


@dataclass
class Check:
    """One peer number to reproduce: a case (or one output of a cross-peer case) and its alias."""

    case: str
    peer: str
    key: str  # the output compared: "loss" or a cross-peer output name
    alias: Alias
    leaves: dict[str, torch.Tensor]  # differentiable inputs, by the peer's name
    build: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor | None]]
    labels: torch.Tensor
    expected: torch.Tensor
    expected_grads: dict[str, torch.Tensor] = field(default_factory=dict)
    per_position: torch.Tensor | None = None  # the peer's unreduced values, one per position
    per_position_valid_only: bool = False  # the peer kept only valid positions (row-major order)
    low_precision: bool = False  # bf16 inputs: the peer may have computed in bf16
    position_weight: torch.Tensor | None = None  # extra per-position weight of the peer's reduction

    @property
    def id(self) -> str:
        return self.case if self.key == "loss" else f"{self.case}[{self.key}]"

    @property
    def peer_finite(self) -> bool:
        grads_finite = all(bool(torch.isfinite(g).all()) for g in self.expected_grads.values())
        return bool(torch.isfinite(self.expected).all()) and grads_finite


def index() -> list[dict]:
    """Rows of the vector index, or an empty list where the vectors are not present."""
    path = VECTORS / "index.json"
    if not path.is_file():
        return []
    return json.loads(path.read_text())


def load_case(name: str) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    case = json.loads((VECTORS / f"{name}.json").read_text())
    inputs = load_file(str(VECTORS / f"{name}.inputs.safetensors"))
    outputs = load_file(str(VECTORS / f"{name}.outputs.safetensors"))
    return case, inputs, outputs


# --- Gradient conversions ------------------------------------------------------------------


def logprob_grad_to_logits(grad: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Chain a gradient taken w.r.t. free log-probabilities through log_softmax, at normalised input."""
    grad, logp = grad.double(), logp.double()
    return (grad - torch.exp(logp) * grad.sum(-1, keepdim=True)).float()


def prob_grad_to_logits(grad: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Chain a gradient taken w.r.t. free probabilities through softmax, at normalised input."""
    grad, probs = grad.double(), probs.double()
    return (probs * grad - probs * (probs * grad).sum(-1, keepdim=True)).float()


# --- Input builders ------------------------------------------------------------------------


def _identity(student: str, teacher: torch.Tensor | None):
    return lambda leaves: (leaves[student], teacher)


def _linear(hidden: str, head: str, teacher: torch.Tensor | None, softcap: float | None = None):
    def build(leaves):
        logits = leaves[hidden] @ leaves[head].t()
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        return logits, teacher

    return build


def _all_valid(logits: torch.Tensor) -> torch.Tensor:
    return torch.zeros(logits.shape[:-1], dtype=torch.long)


def _grads(outputs: dict, names: list[str]) -> dict[str, torch.Tensor]:
    return {name: outputs[f"grad_{name}"] for name in names if f"grad_{name}" in outputs}


def _softcapped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    return softcap * torch.tanh(logits / softcap) if softcap else logits


# --- Per-peer adapters -----------------------------------------------------------------------


def _trl_gkd(name, case, inputs, outputs, alias) -> list[Check]:
    call = case["call"]
    s, t = inputs["student_logits"], inputs["teacher_logits"]
    labels = inputs["labels"] if call.get("labels") is not None else _all_valid(s)
    loss = outputs["loss"]
    check = Check(name, case["peer"], "loss", alias, {"student_logits": s}, _identity("student_logits", t), labels,
                  loss, _grads(outputs, ["student_logits"]), low_precision=s.dtype != torch.float32)
    if loss.dim() > 0:  # reduction "none": the masked (N, V) elementwise terms
        check.expected = loss.float().sum()
        check.per_position = loss.float().sum(-1)
        check.per_position_valid_only = True
    return [check]


class NotExpressible(Exception):
    """The case's inputs have no kdsl meaning (for example probabilities that do not sum to 1)."""


def _trl_gold_probs(name, case, inputs, outputs, alias) -> list[Check]:
    p_s, p_t = inputs["student_probs"], inputs["teacher_probs"]
    for side, probs in (("student", p_s), ("teacher", p_t)):
        total = probs.double().sum(-1)
        if (total - 1).abs().max() > 1e-4:
            raise NotExpressible(
                f"the {side} probabilities sum to {float(total.min()):.3f}..{float(total.max()):.3f}, not 1; "
                "kdsl distributions are normalised"
            )
    leaf = torch.log(p_s)
    grads = {"student_logits": prob_grad_to_logits(outputs["grad_student_probs"], p_s)}
    return [Check(name, case["peer"], "loss", alias, {"student_logits": leaf},
                  _identity("student_logits", torch.log(p_t)), _all_valid(p_s), outputs["loss"], grads)]


def _trl_chunked(name, case, inputs, outputs, alias) -> list[Check]:
    call = case["call"]
    teacher = inputs["teacher_hidden_states"] @ inputs["teacher_lm_head_weight"].t()
    if call.get("teacher_lm_head_bias") is not None:
        teacher = teacher + inputs["teacher_lm_head_bias"]
    teacher = _softcapped(teacher, call.get("teacher_final_logit_softcapping"))
    labels = torch.where(inputs["completion_mask"].bool(), 0, -100)
    leaves = {"student_hidden_states": inputs["student_hidden_states"],
              "student_lm_head_weight": inputs["student_lm_head_weight"]}
    build = _linear("student_hidden_states", "student_lm_head_weight", teacher,
                    call.get("student_final_logit_softcapping"))
    return [Check(name, case["peer"], "loss", alias, leaves, build, labels, outputs["loss"],
                  _grads(outputs, list(leaves)))]


def _distillm(name, case, inputs, outputs, alias) -> list[Check]:
    s = inputs["logits"]
    return [Check(name, case["peer"], "loss", alias, {"logits": s}, _identity("logits", inputs["teacher_logits"]),
                  inputs["label"], outputs["loss"], _grads(outputs, ["logits"]))]


def _dskd_vd(name, case, inputs, outputs, alias) -> list[Check]:
    s = inputs["logits"]
    check = Check(name, case["peer"], "loss", alias, {"logits": s}, _identity("logits", inputs["teacher_logits"]),
                  inputs["target"], outputs["loss"], _grads(outputs, ["logits"]))
    check.per_position = outputs.get("per_token_unmasked")
    return [check]


def _dskd_ce(name, case, inputs, outputs, alias) -> list[Check]:
    s = inputs["logits"]
    return [Check(name, case["peer"], "loss", alias, {"logits": s}, _identity("logits", None), inputs["target"],
                  outputs["loss"], _grads(outputs, ["logits"]))]


def _dskd_full(name, case, inputs, outputs, alias) -> list[Check]:
    leaves = {"student_hidden": inputs["student_hidden"], "student_lm_head": inputs["student_lm_head"]}
    build = _linear("student_hidden", "student_lm_head", outputs["teacher_logits"])
    return [Check(name, case["peer"], "loss", alias, leaves, build, inputs["label"], outputs["loss"],
                  _grads(outputs, list(leaves)))]


def _liger_jsd(name, case, inputs, outputs, alias) -> list[Check]:
    x = inputs["log_q_student"]
    labels = inputs["shift_labels"] if case["call"].get("shift_labels") is not None else _all_valid(x)
    grads = {"log_q_student": logprob_grad_to_logits(outputs["grad_log_q_student"], x)}
    return [Check(name, case["peer"], "loss", alias, {"log_q_student": x},
                  _identity("log_q_student", inputs["log_p_teacher"]), labels, outputs["loss"], grads)]


def _liger_kldiv(name, case, inputs, outputs, alias) -> list[Check]:
    call = case["call"]
    x = inputs["y_pred"]
    teacher = inputs["y_true"] if call["log_target"] else torch.log(inputs["y_true"])
    grads = {"y_pred": logprob_grad_to_logits(outputs["grad_y_pred"], x)}
    loss = outputs["loss"]
    check = Check(name, case["peer"], "loss", alias, {"y_pred": x}, _identity("y_pred", teacher), _all_valid(x),
                  loss, grads)
    if loss.dim() > 0:
        check.expected = loss.sum()
        check.per_position = loss.sum(-1)
    return [check]


def _liger_tvd(name, case, inputs, outputs, alias) -> list[Check]:
    p = inputs["p"]
    grads = {"p": prob_grad_to_logits(outputs["grad_p"], p)}
    loss = outputs["loss"]
    check = Check(name, case["peer"], "loss", alias, {"p": torch.log(p)}, _identity("p", torch.log(inputs["q"])),
                  inputs["shift_labels"], loss, grads)
    if loss.dim() > 0:  # reduction "none": ignored rows are zero
        check.expected = loss.sum()
        check.per_position = loss.sum(-1)
    return [check]


def _liger_linear(name, case, inputs, outputs, alias) -> list[Check]:
    forward = case["call"].get("forward", case["call"])
    labels_key = "true_labels" if "true_labels" in inputs else "shift_labels"
    teacher = inputs["teacher_input"] @ inputs["teacher_weight"].t()
    leaves = {"student_input": inputs["student_input"], "student_weight": inputs["student_weight"]}
    build = _linear("student_input", "student_weight", teacher)
    checks = [Check(name, case["peer"], "loss", alias, leaves, build, inputs[labels_key], outputs["loss"],
                    _grads(outputs, list(leaves)))]
    constructor = case["call"].get("constructor", {})
    for key, weights in (("soft_loss", (0.0, 1.0)), ("hard_loss", (1.0, 0.0))):
        if key in outputs and isinstance(forward, dict):
            part = liger_chunked_jsd({**constructor, "weight_hard_loss": weights[0], "weight_soft_loss": weights[1]})
            checks.append(Check(name, case["peer"], key, part, leaves, build, inputs[labels_key], outputs[key]))
    return checks


def _cross_peer(name, case, inputs, outputs, alias) -> list[Check]:
    s, t, labels = inputs["student_logits"], inputs["teacher_logits"], inputs["labels"]
    return [
        Check(name, case["peer"], key, CROSS_PEER[key], {"student_logits": s}, _identity("student_logits", t),
              labels, value)
        for key, value in sorted(outputs.items())
    ]


# --- ULD: positions aligned the way each peer aligns them ------------------------------------


def _gold_uld(name, case, inputs, outputs, alias) -> list[Check]:
    """GOLD: truncate both responses to the shorter length (less a skipped EOS), per-sample mean, batch mean."""
    config = case["call"]["config"]
    s_labels, t_labels = inputs["student_labels"], inputs["teacher_labels"]
    batch = s_labels.shape[0]
    rows_s, rows_t, weights = [], [], []
    for b in range(batch):
        valid_s = (s_labels[b] != -100).nonzero().flatten()
        valid_t = (t_labels[b] != -100).nonzero().flatten()
        size_s = len(valid_s) - int(config["uld_skip_student_eos"])
        size_t = len(valid_t) - int(config["uld_skip_teacher_eos"])
        count = max(0, min(size_s, size_t))
        start_s = int(valid_s[0]) if len(valid_s) else 0
        start_t = int(valid_t[0]) if len(valid_t) else 0
        rows_s.append(torch.arange(start_s, start_s + count))
        rows_t.append(torch.arange(start_t, start_t + count))
        weights.append(torch.full((count,), 1.0 / (count * batch)) if count else torch.zeros(0))
    index_s = torch.cat([b * s_labels.shape[1] + r for b, r in enumerate(rows_s)])
    index_t = torch.cat([b * t_labels.shape[1] + r for b, r in enumerate(rows_t)])
    teacher = inputs["teacher_logits"].flatten(0, 1)[index_t]  # (K_total, Vt)

    uld_alias = Alias(alias.peer, alias.call, alias.terms[:1], "sum", handled_by=alias.handled_by)

    def build(leaves):
        return leaves["student_logits"].flatten(0, 1)[index_s], teacher

    # GOLD adds the student's next-token CE on labels shifted by one, a mean over valid tokens.
    # The check removes it from the loss and the gradient, so it covers the ULD term alone.
    ce_weight = float(config["uld_crossentropy_weight"])
    leaf = inputs["student_logits"].detach().clone().requires_grad_(True)
    ce = torch.nn.functional.cross_entropy(leaf[:, :-1].flatten(0, 1), s_labels[:, 1:].flatten(), ignore_index=-100)
    (ce_grad,) = torch.autograd.grad(ce_weight * ce, leaf)
    expected = outputs["loss"] - ce_weight * ce.detach()
    grads = {"student_logits": outputs["grad_student_logits"] - ce_grad}
    aligned_labels = torch.zeros(len(index_s), dtype=torch.long)
    return [Check(name, case["peer"], "loss", uld_alias, {"student_logits": inputs["student_logits"]}, build,
                  aligned_labels, expected, grads, position_weight=torch.cat(weights))]


def _dskd_uld(name, case, inputs, outputs, alias) -> list[Check]:
    """DSKD: roll each sequence so its first valid label is at index 0; sum where both sides are valid."""
    s_labels, t_labels = inputs["label"], inputs["teacher_llama_label"]
    length = s_labels.shape[1]
    order_s, order_t, both = [], [], []
    for b in range(s_labels.shape[0]):
        first_s = int((s_labels[b] != -100).nonzero()[0])
        first_t = int((t_labels[b] != -100).nonzero()[0])
        roll_s = (torch.arange(length) + first_s) % length
        roll_t = (torch.arange(length) + first_t) % length
        order_s.append(b * length + roll_s)
        order_t.append(b * length + roll_t)
        both.append((s_labels[b][roll_s] != -100) & (t_labels[b][roll_t] != -100))
    index_s, index_t = torch.cat(order_s), torch.cat(order_t)
    mask = torch.cat(both)
    teacher = outputs["teacher_logits"].flatten(0, 1)[index_t]
    rate = float(case["call"]["constructor_args"]["kd_rate"])
    denominator = float(outputs["batch_denom"])
    uld_alias = Alias(alias.peer, alias.call, alias.terms[1:], "sum", handled_by=alias.handled_by)

    def build(leaves):
        logits = leaves["student_hidden"] @ leaves["student_lm_head"].t()
        return logits.flatten(0, 1)[index_s], teacher

    labels = torch.where(mask, 0, -100)
    # Remove DSKD's CE part, (1 - rate) · Σ NLL / batch_denom over the valid student tokens,
    # from the loss and the gradients, so that the check covers the ULD term alone.
    leaves = {"student_hidden": inputs["student_hidden"], "student_lm_head": inputs["student_lm_head"]}
    hidden, head = (leaves[k].detach().clone().requires_grad_(True) for k in ("student_hidden", "student_lm_head"))
    nll = torch.nn.functional.cross_entropy((hidden @ head.t()).flatten(0, 1), s_labels.flatten(),
                                            ignore_index=-100, reduction="sum")
    ce_part = (1.0 - rate) * nll / denominator
    ce_grads = torch.autograd.grad(ce_part, [hidden, head])
    expected = outputs["loss"] - ce_part.detach()
    grads = {k: outputs[f"grad_{k}"] - g for k, g in zip(("student_hidden", "student_lm_head"), ce_grads)}
    return [Check(name, case["peer"], "loss", uld_alias, leaves, build, labels, expected, grads,
                  position_weight=torch.full((len(index_s),), 1.0 / denominator))]


ADAPTERS: list[tuple[str, Callable]] = [
    ("GKDTrainer.generalized_jsd_loss", _trl_gkd),
    ("GOLDTrainer.generalized_jsd_loss", None),  # chosen below by logits_are_probs
    ("ULDLoss", _gold_uld),
    ("_chunked_divergence_loss", _trl_chunked),
    ("distillm/losses.py::", _distillm),
    ("compute_cross_entropy_loss", _dskd_ce),
    ("VariousDivergence.compute_", _dskd_vd),
    ("universal_logit_distillation", _dskd_uld),
    ("various_divergence.py::VariousDivergence.forward", _dskd_full),
    ("LigerJSDFunction", _liger_jsd),
    ("LigerKLDivLossFunction", _liger_kldiv),
    ("LigerTVDLossFunction", _liger_tvd),
    ("LigerFusedLinearJSDFunction", _liger_linear),
    ("chunked_loss", _liger_linear),
    ("see outputs", _cross_peer),
]


def checks_for_case(name: str) -> tuple[Alias, list[Check]]:
    """Return the case's alias and its checks (none where another module or no kdsl construct covers it)."""
    case, inputs, outputs = load_case(name)
    if case["function"].startswith("see outputs"):
        return CROSS_PEER["loss"], _cross_peer(name, case, inputs, outputs, None)
    alias = alias_for_case(case)
    if not alias.expressible:
        return alias, []
    function = case["function"]
    if "GOLDTrainer.generalized_jsd_loss" in function:
        adapter = _trl_gold_probs if case["call"].get("logits_are_probs") else _trl_gkd
        try:
            return alias, adapter(name, case, inputs, outputs, alias)
        except NotExpressible as error:
            return replace(alias, expressible=False, note=f"{alias.note}; this case: {error}"), []
    for marker, adapter in ADAPTERS:
        if marker in function and adapter is not None:
            return alias, adapter(name, case, inputs, outputs, alias)
    if alias.handled_by:
        return alias, []
    raise KeyError(f"no adapter for case {name!r} ({function})")
