"""The alias table: each peer KD loss call and the kdsl objective that computes the same thing.

An `Alias` pairs a peer call (TRL, DistiLLM, DSKD, Liger-Kernel) with a kdsl
objective in structured form: weighted atoms over the teacher `o` and the
student `q`. The objective text is printed from that structure, so the text
users copy and the structure the tests evaluate cannot drift apart.

`alias_for_case(case)` reads a reference case (its JSON: the function and the
call arguments) and builds the alias from the call's parameters, so a case
with new parameter values needs no new table row. docs/aliases.md is the
human-readable version of this table.

Notation: `o` is the teacher and `q` the student. A peer's reduction maps to
the `num_items` argument of the compiled objective, which replaces the
number of valid tokens as the denominator (see `Alias.denominator`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

PROJECTION = "kdsl/projection.py"  # the module that reproduces cross-vocabulary cases


def format_number(value: float) -> str:
    """Print a coefficient the way a user writes it: 1 → "1", 1e-6 → "0.000001"."""
    if float(value).is_integer():
        return str(int(value))
    return np.format_float_positional(float(value), trim="-")


# --- Structured objectives ---------------------------------------------------------------


@dataclass(frozen=True)
class Model:
    """The teacher `o` or the student `q`, optionally at a temperature."""

    name: str
    temperature: float | None = None

    def text(self) -> str:
        if self.temperature is None or self.temperature == 1.0:
            return self.name
        return f"{self.name}[τ={format_number(self.temperature)}]"


@dataclass(frozen=True)
class Mixture:
    """A convex mixture Σ w_i·D_i, formed from probabilities."""

    parts: tuple[tuple[float, Model], ...]

    def text(self) -> str:
        return " + ".join(f"{format_number(w)}·{model.text()}" for w, model in self.parts)


Dist = Union[Model, Mixture]


@dataclass(frozen=True)
class Atom:
    """One kdsl loss atom: KL, JS, TV, SKL, SRKL, H (one or two arguments), CE or ULD."""

    kind: str
    args: tuple[Dist, ...] = ()
    param: float | None = None

    def text(self) -> str:
        if self.kind == "CE":
            return "CE"
        bracket = f"[{format_number(self.param)}]" if self.param is not None else ""
        separator = " ‖ " if self.kind in ("KL", "JS", "SKL", "SRKL") else ", "
        return f"{self.kind}{bracket}({separator.join(arg.text() for arg in self.args)})"


o, q = Model("o"), Model("q")


def teacher(temperature: float | None = None) -> Model:
    return Model("o", temperature)


def student(temperature: float | None = None) -> Model:
    return Model("q", temperature)


DENOMINATORS = {
    "tokens": "mean over valid tokens (kdsl's default; num_items=None)",
    "sum": "sum over valid tokens (num_items=1)",
    "tokens_x_vocab": "sum / (valid tokens × vocabulary size) (num_items=N·V)",
    "batch_rows": "sum / first dimension of the logits (num_items=B)",
    "fixed": "sum / a fixed count (num_items=that count)",
    "sample_mean": "mean over samples of each sample's token mean",
}


@dataclass(frozen=True)
class Alias:
    """A peer call and the kdsl objective with the same value and gradient."""

    peer: str
    call: str
    terms: tuple[tuple[float, Atom], ...]
    denominator: str = "tokens"
    fixed_items: int | None = None
    note: str = ""
    handled_by: str | None = None  # another module reproduces this case (cross-vocabulary)
    expressible: bool = True  # False: kdsl has no construct for this loss
    settings: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self):
        if self.denominator not in DENOMINATORS:
            raise ValueError(f"unknown denominator {self.denominator!r}; expected one of {sorted(DENOMINATORS)}")
        if (self.denominator == "fixed") != (self.fixed_items is not None):
            raise ValueError("fixed_items is required with denominator 'fixed' and only there")

    @property
    def expression(self) -> str:
        parts = []
        for coefficient, atom in self.terms:
            prefix = "" if coefficient == 1.0 else f"{format_number(coefficient)}·"
            parts.append(prefix + atom.text())
        return " + ".join(parts)

    @property
    def objective(self) -> str:
        if not self.expressible:
            return "(no kdsl equivalent)"
        return f"objective = {self.expression}"

    def num_items(self, labels, vocab: int) -> int | None:
        """The `num_items` argument that reproduces the peer's denominator (None: kdsl's default)."""
        valid = int((labels != -100).sum())
        if self.denominator == "tokens":
            return None
        if self.denominator == "sum":
            return 1
        if self.denominator == "tokens_x_vocab":
            return valid * vocab
        if self.denominator == "batch_rows":
            return int(labels.shape[0])
        if self.denominator == "sample_mean":
            raise ValueError("a per-sample mean has no num_items equivalent; weight each token by 1/T "
                             "and set reduction = \"sequence\"")
        return self.fixed_items


# --- huggingface/trl -----------------------------------------------------------------------


def _jsd_atom(beta: float, temperature: float | None) -> Atom:
    """TRL's and Liger's generalised JSD: β weights the teacher; β = 0 and 1 jump to plain KLs."""
    o_t, q_t = teacher(temperature), student(temperature)
    if beta == 0.0:
        return Atom("KL", (o_t, q_t))
    if beta == 1.0:
        return Atom("KL", (q_t, o_t))
    return Atom("JS", (o_t, q_t), beta)


def _jsd_note(beta: float) -> str:
    if beta == 0.0:
        return "β = 0 is special-cased to the forward KL"
    if beta == 1.0:
        return "β = 1 is special-cased to the reverse KL"
    if beta < 1e-3 or beta > 1 - 1e-3:
        return "β near an endpoint is the continuous JS, close to 0 and far from the endpoint's KL"
    return ""


def trl_generalized_jsd(call: dict, *, gold: bool = False) -> Alias:
    beta, temperature = float(call["beta"]), float(call.get("temperature", 1.0))
    reduction = call.get("reduction", "batchmean")
    num_items = call.get("num_items_in_batch")
    has_labels = call.get("labels") is not None
    owner = "GOLDTrainer" if gold else "GKDTrainer"
    text = f"{owner}.generalized_jsd_loss(beta={beta:g}, temperature={temperature:g}, reduction={reduction!r}"
    note = [_jsd_note(beta)]
    if num_items is not None:
        denominator, fixed = "fixed", int(num_items)
        text += f", num_items_in_batch={num_items}"
    elif reduction == "batchmean" and has_labels:
        denominator, fixed = "tokens", None
    elif reduction == "batchmean":
        denominator, fixed = "batch_rows", None
        note.append("without labels every position counts and batchmean divides by the first dimension")
    elif reduction == "sum":
        denominator, fixed = "sum", None
    elif reduction == "mean":
        denominator, fixed = "tokens_x_vocab", None
        note.append("'mean' averages over the vocabulary too")
    else:
        denominator, fixed = "sum", None
        note.append("unreduced (N, V) output; compared per position")
    if call.get("logits_are_probs"):
        text += ", logits_are_probs=True"
        note.append("inputs are probabilities: pass their logs as logits; TRL clamps them at 1e-8 without renormalising")
    if not has_labels:
        text += ", labels=None"
    return Alias(
        "huggingface/trl", text + ")", ((1.0, _jsd_atom(beta, temperature)),),
        denominator, fixed, note="; ".join(n for n in note if n),
    )


def trl_chunked_divergence(call: dict) -> Alias:
    beta, temperature = float(call["beta"]), float(call.get("temperature", 1.0))
    num_items = call.get("num_items_in_batch")
    softcap = call.get("student_final_logit_softcapping")
    text = f"DistillationTrainer _chunked_divergence_loss(beta={beta:g}, temperature={temperature:g}"
    note = [_jsd_note(beta), "logits = hidden @ lm_head.T are passed as student/teacher logits"]
    if softcap:
        text += f", softcapping={softcap:g}"
        note.append("softcapping belongs to the model's logits: apply it before the objective")
    if num_items is not None:
        text += f", num_items_in_batch={num_items}"
    return Alias(
        "huggingface/trl", text + ")", ((1.0, _jsd_atom(beta, temperature)),),
        "fixed" if num_items is not None else "tokens", int(num_items) if num_items is not None else None,
        note="; ".join(n for n in note if n),
    )


def trl_gold_uld(config: dict) -> Alias:
    t_s, t_t = config["uld_student_temperature"], config["uld_teacher_temperature"]
    ce_weight, uld_weight = config["uld_crossentropy_weight"], config["uld_distillation_weight"]
    terms = [(float(uld_weight), Atom("ULD", (teacher(t_t), student(t_s))))]
    if ce_weight:
        terms.append((float(ce_weight), Atom("CE")))
    skip = config["uld_skip_student_eos"]
    return Alias(
        "huggingface/trl",
        f"GOLD ULDLoss(crossentropy_weight={ce_weight:g}, distillation_weight={uld_weight:g}, "
        f"temperatures={t_s:g}/{t_t:g}, skip_eos={skip}, extended=False)",
        tuple(terms), "sample_mean", handled_by=PROJECTION,
        note="positions are aligned by truncating both responses to the shorter length (less the EOS when skipped); "
        "the CE is a token mean over the student's own labels",
    )


# --- jongwooko/distillm --------------------------------------------------------------------


def _complement(weight: float) -> float:
    """1 − w without binary noise: 1 − 0.9 prints as 0.1, not 0.09999999999999998."""
    return round(1.0 - weight, 12)


def distillm(function: str, lam: float | None) -> Alias:
    """DistiLLM losses: the "forward" forms are cross-entropies, and λ weights the student in JS."""
    call = f"distillm.losses.{function}" + (f"(lam={lam:g})" if lam is not None else "")
    if function == "forward_kl":
        terms = ((1.0, Atom("H", (o, q))),)
        note = "cross-entropy: KL(o ‖ q) + H(o); same gradient as the KL"
    elif function == "reverse_kl":
        terms, note = ((1.0, Atom("KL", (q, o))),), ""
    elif function == "symmetric_kl":
        terms = ((_complement(lam), Atom("H", (o, q))), (lam, Atom("KL", (q, o))))
        note = "its forward part is the cross-entropy form"
    elif function == "js_distance":
        terms, note = ((1.0, Atom("JS", (o, q), _complement(lam))),), "DistiLLM's λ weights the student: β = 1 − λ"
    elif function == "tv_distance":
        terms, note = ((1.0, Atom("TV", (o, q))),), ""
    elif function == "skewed_forward_kl":
        if lam == 1.0:
            terms = ((1.0, Atom("H", (o,))),)
        elif lam == 0.0:
            terms = ((1.0, Atom("H", (o, q))),)
        else:
            terms = ((1.0, Atom("SKL", (o, q), lam)), (1.0, Atom("H", (o,))))
        note = "cross-entropy form H(o, λ·o + (1−λ)·q) = SKL[λ](o ‖ q) + H(o); same gradient as SKL"
    elif function == "skewed_reverse_kl":
        terms, note = ((1.0, Atom("SRKL", (o, q), lam)),), ""
    else:
        raise KeyError(f"no alias for DistiLLM function {function!r}")
    return Alias("jongwooko/distillm", call, terms, "tokens", note=note)


# --- songmzhang/DSKD -----------------------------------------------------------------------


def _dskd_atom(objective: str, t_o: float | None, t_q: float | None, skew: float) -> Atom:
    o_t, q_t = teacher(t_o), student(t_q)
    atoms = {
        "forward_kl": Atom("KL", (o_t, q_t)),
        "reverse_kl": Atom("KL", (q_t, o_t)),
        "skewed_forward_kl": Atom("SKL", (o_t, q_t), skew),
        "skewed_reverse_kl": Atom("SRKL", (o_t, q_t), skew),
        "js_divergence": Atom("JS", (o_t, q_t), 0.5),
    }
    if objective not in atoms:
        raise KeyError(f"no kdsl atom for DSKD kd_objective {objective!r}")
    return atoms[objective]


def dskd_various_divergence(args: dict, method: str, use_tea_temp: bool, reduction: str) -> Alias:
    objective = method.removeprefix("compute_").removesuffix("_divergence")
    if objective == "js":
        objective = "js_divergence"
    t = float(args["kd_temperature"])
    t_o = t * float(args["teacher_temperature"]) if use_tea_temp else t
    call = f"VariousDivergence.{method}(kd_temperature={t:g}"
    if use_tea_temp:
        call += f", teacher_temperature={args['teacher_temperature']:g}, use_tea_temp=True"
    if "skewed" in objective:
        call += f", skew_lambda={args['skew_lambda']:g}"
    if objective == "adaptive_kl":
        return Alias(
            "songmzhang/DSKD", call + f", adaptive_kl_alpha={args['adaptive_kl_alpha']:g})", (),
            "sum", expressible=False,
            note="AKL weights FKL and RKL by detached head/tail gaps of the whole distribution; "
            "a kdsl per-token weight sees only o(w_t), q(w_t), t and T",
        )
    atom = _dskd_atom(objective, t_o, t, float(args["skew_lambda"]))
    note = "a sum over valid tokens; DSKD's trainer divides it by the global token count later"
    if objective == "js_divergence":
        note += "; DSKD adds 1e-9 inside each log"
    return Alias("songmzhang/DSKD", call + f", reduction={reduction!r})", ((1.0, atom),),
                 "sum" if reduction == "sum" else "tokens", note=note)


def dskd_cross_entropy(label_smoothing: float) -> Alias:
    call = f"CrossEntropyLoss.compute_cross_entropy_loss(label_smoothing={label_smoothing:g})"
    if label_smoothing == 0.0:
        return Alias("songmzhang/DSKD", call, ((1.0, Atom("CE")),), "sum", note="a sum over valid tokens")
    return Alias(
        "songmzhang/DSKD", call, (), "sum", expressible=False,
        note="label smoothing mixes in the uniform distribution, which kdsl has no name for; "
        "DSKD's value is also wrong (the summed NLL is counted N times)",
    )


def dskd_full(criterion: str, args: dict) -> Alias:
    rate = float(args["kd_rate"])
    t = float(args["kd_temperature"])
    rest = _complement(rate)
    if criterion == "VariousDivergence":
        atom = _dskd_atom(args["kd_objective"], t, t, float(args["skew_lambda"]))
        return Alias(
            "songmzhang/DSKD", f"VariousDivergence(kd_rate={rate:g}, kd_objective={args['kd_objective']!r}, "
            f"kd_temperature={t:g}) / batch_denom", ((rest, Atom("CE")), (rate, atom)), "tokens",
            note="batch_denom = valid student tokens, so the result is a token mean",
        )
    if criterion == "UniversalLogitDistillation":
        return Alias(
            "songmzhang/DSKD", f"UniversalLogitDistillation(kd_rate={rate:g}) / batch_denom",
            ((rest, Atom("CE")), (rate, Atom("ULD", (o, q)))), "tokens", handled_by=PROJECTION,
            note="each sequence is rolled so that its first valid label is at index 0; "
            "ULD is summed where both sides are valid and divided by the valid student tokens",
        )

    # Dual-Space KD: the student-space term uses kd_objective against the projected teacher o→q,
    # the teacher-space term is always the forward KL against the projected student q→o.
    t_teacher = t * float(args["teacher_temperature"]) if criterion == "DualSpaceKDWithCMA" else t
    projected_teacher, projected_student = Model("o→q", t_teacher), Model("q→o", t)
    if args["kd_objective"] == "reverse_kl":
        student_space = Atom("KL", (student(t), projected_teacher))
    else:
        student_space = Atom("KL", (projected_teacher, student(t)))
    teacher_space = Atom("KL", (teacher(t), projected_student))
    return Alias(
        "songmzhang/DSKD", f"{criterion}(kd_rate={rate:g}, kd_objective={args['kd_objective']!r}, "
        f"kd_temperature={t:g}) / batch_denom",
        ((rest, Atom("CE")), (rate, student_space), (rate, teacher_space)), "tokens", handled_by=PROJECTION,
        note="the projectors also train on their own CE of o→q; with CMA only tokens where o→q "
        "predicts the label count in the student-space term",
    )


# --- linkedin/Liger-Kernel -----------------------------------------------------------------


def liger_jsd(call: dict) -> Alias:
    beta = float(call["beta"])
    has_labels = call.get("shift_labels") is not None
    note = [_jsd_note(beta), "inputs are log-probabilities (student first): pass them as logits"]
    if not has_labels:
        note.append("without labels every row counts")
    return Alias(
        "linkedin/Liger-Kernel", f"LigerJSD(beta={beta:g})" + ("" if has_labels else " without shift_labels"),
        ((1.0, _jsd_atom(beta, None)),), "tokens", note="; ".join(n for n in note if n),
    )


def liger_kldiv(call: dict) -> Alias:
    reduction = call["reduction"]
    denominator = {"batchmean": "tokens", "sum": "sum", "mean": "tokens_x_vocab", "none": "sum"}[reduction]
    target = "log-probabilities" if call["log_target"] else "probabilities (logged, zeros give -inf)"
    return Alias(
        "linkedin/Liger-Kernel", f"LigerKLDIVLoss(reduction={reduction!r}, log_target={call['log_target']})",
        ((1.0, Atom("KL", (o, q))),), denominator,
        note=f"y_pred is the student's log-probabilities, y_true the teacher's {target}; no ignore_index, "
        "so every row counts",
    )


def liger_tvd(call: dict) -> Alias:
    reduction = call["reduction"]
    denominator = {"batchmean": "tokens", "sum": "sum", "mean": "tokens_x_vocab", "none": "sum"}[reduction]
    return Alias(
        "linkedin/Liger-Kernel", f"LigerTVDLoss(reduction={reduction!r})", ((1.0, Atom("TV", (o, q))),),
        denominator, note="inputs are probabilities: pass their logs as logits; Liger differentiates p only",
    )


def liger_fused_linear_jsd(beta: float, temperature: float) -> Alias:
    return Alias(
        "linkedin/Liger-Kernel", f"LigerFusedLinearJSD(jsd_beta={beta:g}, temperature={temperature:g})",
        ((1.0, _jsd_atom(beta, temperature)),), "tokens",
        note="; ".join(n for n in (_jsd_note(beta), "logits = hidden @ lm_head.T") if n),
    )


def liger_chunked_jsd(constructor: dict) -> Alias:
    beta, temperature = float(constructor["beta"]), float(constructor["temperature"])
    hard, soft = float(constructor["weight_hard_loss"]), float(constructor["weight_soft_loss"])
    terms = []
    if hard:
        terms.append((hard, Atom("CE")))
    if soft:
        terms.append((soft, _jsd_atom(beta, temperature)))
    return Alias(
        "linkedin/Liger-Kernel",
        f"LigerFusedLinearJSDLoss(weight_hard_loss={hard:g}, weight_soft_loss={soft:g}, beta={beta:g}, "
        f"temperature={temperature:g})", tuple(terms), "tokens",
        note="; ".join(n for n in (_jsd_note(beta), "the hard CE is at temperature 1") if n),
    )


def liger_cosine(constructor: dict) -> Alias:
    return Alias(
        "linkedin/Liger-Kernel", f"LigerFusedLinearCosineSimilarityLoss(beta={constructor['beta']:g})", (),
        "tokens", expressible=False,
        note="cosine similarity of raw logits is not a divergence between distributions; "
        "Liger also sums it over ignored rows",
    )


# --- Cases -----------------------------------------------------------------------------------


# (marker in the case's function name, builder from the case JSON), tried in order.
_BUILDERS = [
    ("GKDTrainer.generalized_jsd_loss", lambda case: trl_generalized_jsd(case["call"])),
    ("GOLDTrainer.generalized_jsd_loss", lambda case: trl_generalized_jsd(case["call"], gold=True)),
    ("ULDLoss", lambda case: trl_gold_uld(case["call"]["config"])),
    ("_chunked_divergence_loss", lambda case: trl_chunked_divergence(case["call"])),
    ("distillm/losses.py::", lambda case: distillm(case["function"].split("::")[1], case["call"].get("lam"))),
    ("compute_cross_entropy_loss",
     lambda case: dskd_cross_entropy(float(case["call"]["constructor_args"]["label_smoothing"]))),
    ("VariousDivergence.compute_", lambda case: dskd_various_divergence(
        case["call"]["constructor_args"], case["call"]["method"], case["call"]["use_tea_temp"],
        case["call"]["reduction"])),
    ("code/criterions/", lambda case: dskd_full(case["call"]["criterion"], case["call"]["constructor_args"])),
    ("LigerJSDFunction", lambda case: liger_jsd(case["call"])),
    ("LigerKLDivLossFunction", lambda case: liger_kldiv(case["call"])),
    ("LigerTVDLossFunction", lambda case: liger_tvd(case["call"])),
    ("LigerFusedLinearJSDFunction", lambda case: liger_fused_linear_jsd(
        float(case["call"]["jsd_beta"]), float(case["call"]["temperature"]))),
    ("CosineSimilarityLoss", lambda case: liger_cosine(case["call"]["constructor"])),
    ("LigerFusedLinearJSDLoss", lambda case: liger_chunked_jsd(case["call"]["constructor"])),
]


def alias_for_case(case: dict) -> Alias:
    """Build the alias of one reference case from its function name and call arguments."""
    for marker, build in _BUILDERS:
        if marker in case["function"]:
            return build(case)
    raise KeyError(f"no alias for peer function {case['function']!r}; add a builder to tests/conformance/aliases.py")


# Output keys of the cross-peer cases: `<family>.<peer function>` on shared inputs.
CROSS_PEER = {
    "fkl.trl_gkd_beta0": trl_generalized_jsd({"beta": 0.0, "labels": "@labels"}),
    "fkl.liger_jsd_beta0": liger_jsd({"beta": 0.0, "shift_labels": "@labels"}),
    "fkl.dskd_forward_kl_sum_div_n": dskd_various_divergence(
        {"kd_temperature": 1.0, "teacher_temperature": 1.0, "skew_lambda": 0.1},
        "compute_forward_kl_divergence", False, "mean"),
    "fkl.distillm_forward_kl_(cross_entropy)": distillm("forward_kl", None),
    "fkl.teacher_entropy_mean": Alias("cross-peer", "mean teacher entropy", ((1.0, Atom("H", (o,))),)),
    "rkl.trl_gkd_beta1": trl_generalized_jsd({"beta": 1.0, "labels": "@labels"}),
    "rkl.liger_jsd_beta1": liger_jsd({"beta": 1.0, "shift_labels": "@labels"}),
    "rkl.distillm_reverse_kl": distillm("reverse_kl", None),
    "rkl.dskd_reverse_kl_sum_div_n": dskd_various_divergence(
        {"kd_temperature": 1.0, "teacher_temperature": 1.0, "skew_lambda": 0.1},
        "compute_reverse_kl_divergence", False, "mean"),
    "jsd05.trl_gkd_beta0.5": trl_generalized_jsd({"beta": 0.5, "labels": "@labels"}),
    "jsd05.liger_jsd_beta0.5": liger_jsd({"beta": 0.5, "shift_labels": "@labels"}),
    "jsd05.distillm_js_distance_lam0.5": distillm("js_distance", 0.5),
    "jsd05.dskd_js_divergence_sum_div_n": dskd_various_divergence(
        {"kd_temperature": 1.0, "teacher_temperature": 1.0, "skew_lambda": 0.1},
        "compute_js_divergence", False, "mean"),
    "gjsd.trl_gkd_beta0.1": trl_generalized_jsd({"beta": 0.1, "labels": "@labels"}),
    "gjsd.trl_gkd_beta0.9": trl_generalized_jsd({"beta": 0.9, "labels": "@labels"}),
    "gjsd.liger_jsd_beta0.1": liger_jsd({"beta": 0.1, "shift_labels": "@labels"}),
    "gjsd.distillm_js_distance_lam0.1": distillm("js_distance", 0.1),
    "gjsd.distillm_js_distance_lam0.9": distillm("js_distance", 0.9),
    "skl.distillm_skewed_forward_kl_lam0.1_(cross_entropy)": distillm("skewed_forward_kl", 0.1),
    "skl.dskd_skewed_forward_kl_lam0.1_sum_div_n": dskd_various_divergence(
        {"kd_temperature": 1.0, "teacher_temperature": 1.0, "skew_lambda": 0.1},
        "compute_skewed_forward_kl_divergence", False, "mean"),
    "srkl.distillm_skewed_reverse_kl_lam0.1": distillm("skewed_reverse_kl", 0.1),
    "srkl.dskd_skewed_reverse_kl_lam0.1_sum_div_n": dskd_various_divergence(
        {"kd_temperature": 1.0, "teacher_temperature": 1.0, "skew_lambda": 0.1},
        "compute_skewed_reverse_kl_divergence", False, "mean"),
    "tvd.distillm_tv_distance": distillm("tv_distance", None),
    "tvd.liger_tvd_batchmean": liger_tvd({"reduction": "batchmean"}),
}
CROSS_PEER["loss"] = CROSS_PEER["jsd05.trl_gkd_beta0.5"]


# Cases where the peer returns a finite number that differs from the true value. The
# conformance test checks kdsl against the float64 reference there, and checks that
# the peer's number still differs, so each entry stays true.
PEER_ERRORS = {
    "distillm_forward_kl_student_neginf": "DistiLLM zeroes the terms where the student logit is -inf, "
    "but the teacher has mass there, so the cross-entropy is +inf",
    "distillm_js_distance_teacher_neginf": "DistiLLM zeroes the terms where the teacher logit is -inf, "
    "dropping the student's λ·q·log(1/λ) share of the JS",
    "distillm_skewed_reverse_kl_lam0.1_teacher_neginf": "DistiLLM zeroes the terms where the teacher logit is -inf, "
    "dropping q·log(1/λ) from KL(q ‖ (1−λ)·o + λ·q)",
    "dskd_vd_reverse_kl_teacher_neginf": "DSKD zeroes the terms where the teacher logit is -inf, "
    "but the student has mass there, so KL(q ‖ o) is +inf (DSKD's gradient is NaN as well)",
    "dskd_vd_js_divergence_teacher_neginf": "DSKD zeroes the terms where the teacher logit is -inf, "
    "dropping the student's ½·q·log 2 share of the JS",
}
