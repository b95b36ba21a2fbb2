"""Graphs of hand-built objectives: golden text forms, sharing, naming and the verifier.

Each entry of `CASES` is an objective built by hand (as the checker would
build it) with a float64 reference written directly in torch. The golden
file `tests/golden/graphs/<name>.graph` contains its printed graph. Set
KDSL_UPDATE_GOLDEN=1 to rewrite the files after a deliberate change.
`tests/test_lower.py` checks the numeric twin of every case: the compiled
value and student gradient against `reference`.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import pytest
import sympy
import torch

from kdsl import ir
from kdsl.errors import InternalError, Span
from kdsl.objective import (
    EPOCH,
    LENGTH,
    LOG_O_TOKEN,
    LOG_Q_SEQ,
    LOG_Q_TOKEN,
    LOG_REF_SEQ,
    POSITION,
    PROGRESS,
    DataSource,
    Divergence,
    FunctionDef,
    MixtureDist,
    MixtureSource,
    ModelDist,
    Objective,
    ProjectedDist,
    Scalar,
    StudentSource,
    Term,
)

GOLDEN_DIR = Path(__file__).parent / "golden" / "graphs"

# --- Hand-built objectives ------------------------------------------------------------------


def span(line: int, column: int, width: int = 1) -> Span:
    return Span("spec.kd", line, column, line, column + width)


def number(value) -> Scalar:
    return Scalar(sympy.nsimplify(value))


O = ModelDist("o", span=span(1, 16))
Q = ModelDist("q", span=span(1, 20))
HALF = sympy.Rational(1, 2)


def tempered(model: str, tau) -> ModelDist:
    return ModelDist(model, temperature=number(tau), span=span(1, 16, 8))


def div(kind: str, *args, param=None, generator=None, column: int = 13) -> Divergence:
    return Divergence(kind, tuple(args), param=number(param) if param is not None else None,
                      generator=generator, span=span(1, column, 9))


def objective(*terms: Term, reduction: str = "token", settings=None, definitions=None, groups=None) -> Objective:
    return Objective(
        terms=list(terms),
        groups=groups or [DataSource()],
        settings=dict(settings or {}),
        definitions=dict(definitions or {}),
        reduction=reduction,
        source_text="\n".join(term.name for term in terms),
    )


# Weights and schedules used below.
LAMBDA = sympy.exp(-POSITION / 4) * (1 - sympy.exp(LOG_O_TOKEN))
RAMP = POSITION / LENGTH * sympy.exp(LOG_Q_TOKEN)
PHI = HALF * (1 + sympy.cos(sympy.pi * EPOCH / 3))
RHO = sympy.exp(LOG_REF_SEQ - LOG_Q_SEQ)
CLIPPED = sympy.Piecewise((sympy.Integer(2), EPOCH < 1), (sympy.Max(0, 1 - EPOCH / 4), True))
T_LOG_T = sympy.Lambda(sympy.Symbol("r", positive=True), sympy.Symbol("r", positive=True) * sympy.log(sympy.Symbol("r", positive=True)))
CHI2 = sympy.Lambda(sympy.Symbol("r", positive=True), (sympy.Symbol("r", positive=True) - 1) ** 2)


# --- Float64 reference ----------------------------------------------------------------------


class Ref:
    """Per-position quantities of one batch in float64, written with plain torch operations."""

    def __init__(self, student, teacher, labels, ref=None, vocab=None):
        self.labels = labels
        self.valid = labels != -100
        self.s = student.double()[..., :vocab]  # a None vocab keeps every column
        self.t = teacher.double()[..., :vocab] if teacher is not None else None
        self.r = ref.double() if ref is not None else None
        self.position = self.valid.long().cumsum(1).double()
        # T of a row with no valid position is never used; 1 keeps t/T finite there.
        self.length = self.valid.long().sum(1, keepdim=True).clamp_min(1).double().expand_as(self.position)

    def logits(self, model: str):
        return {"q": self.s, "o": self.t, "ref": self.r}[model]

    def logp(self, model: str, tau=None, top_k=None):
        z = self.logits(model)
        if tau is not None:
            z = z / tau
        if top_k is not None:
            kept = z.topk(top_k, dim=-1).indices
            keep = torch.zeros_like(z, dtype=torch.bool).scatter(-1, kept, True)
            z = torch.where(keep, z, float("-inf"))
        return torch.log_softmax(z, dim=-1)

    @staticmethod
    def mix(*parts):
        """log Σ w·p in float64, as a log-sum-exp of log w + log p."""
        return torch.logsumexp(torch.stack([logp + torch.log(torch.tensor(float(w), dtype=torch.float64))
                                            for w, logp in parts]), dim=0)

    @staticmethod
    def kl(la, lb):
        """Σ a·(log a − log b), 0 where a = 0 (also where a underflows to 0 in float64)."""
        on = torch.exp(la) > 0
        a_safe = torch.where(on, la, 0.0)
        b_safe = torch.where(on, lb, 0.0)
        return torch.where(on, torch.exp(a_safe) * (a_safe - b_safe), 0.0).sum(-1)

    @staticmethod
    def tv(la, lb):
        return 0.5 * (torch.exp(la) - torch.exp(lb)).abs().sum(-1)

    @staticmethod
    def cross_entropy(la, lb):
        on = torch.exp(la) > 0
        return torch.where(on, -torch.exp(torch.where(on, la, 0.0)) * torch.where(on, lb, 0.0), 0.0).sum(-1)

    @staticmethod
    def entropy(la):
        return Ref.cross_entropy(la, la)

    def token_logp(self, logp):
        safe = torch.where(self.valid, self.labels, 0)
        return logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)

    def ce(self):
        return -self.token_logp(self.logp("q"))

    def sequence_logp(self, model: str):
        return torch.where(self.valid, self.token_logp(self.logp(model)), 0.0).sum(1)

    def token_mean(self, per_position, weight=None):
        values = per_position if weight is None else weight * per_position
        return torch.where(self.valid, values, 0.0).sum() / max(int(self.valid.sum()), 1)

    def sequence_mean(self, per_position, weight=None):
        values = per_position if weight is None else weight * per_position
        sequences = int((self.valid.sum(1) > 0).sum())
        return torch.where(self.valid, values, 0.0).sum() / max(sequences, 1)


# --- The table ------------------------------------------------------------------------------


@dataclass
class Case:
    """A hand-built objective, its float64 reference and the call arguments it needs."""

    name: str
    objective: Objective
    reference: Callable[[Ref, dict], torch.Tensor]
    needs: tuple[str, ...] = ("student", "teacher")
    call: dict = field(default_factory=dict)


def _lambda_weight(r: Ref) -> torch.Tensor:
    return (torch.exp(-r.position / 4) * (1 - torch.exp(r.token_logp(r.logp("o"))))).detach()


def _phi(call: dict) -> float:
    return 0.5 * (1 + torch.cos(torch.tensor(torch.pi * call.get("epoch", 0.0) / 3, dtype=torch.float64)).item())


CASES = [
    Case("kl_forward", objective(Term("KL(o‖q)", div("KL", O, Q))),
         lambda r, c: r.token_mean(r.kl(r.logp("o"), r.logp("q")))),
    Case("kl_reverse", objective(Term("KL(q‖o)", div("KL", Q, O))),
         lambda r, c: r.token_mean(r.kl(r.logp("q"), r.logp("o")))),
    Case("ce", objective(Term("CE", div("CE"))),
         lambda r, c: r.token_mean(r.ce()), needs=("student",)),
    Case("kl_plus_ce", objective(Term("0.5·KL(o‖q)", div("KL", O, Q), coefficient=number(0.5)),
                                 Term("0.5·CE", div("CE"), coefficient=number(0.5))),
         lambda r, c: 0.5 * r.token_mean(r.kl(r.logp("o"), r.logp("q"))) + 0.5 * r.token_mean(r.ce())),
    Case("js_half", objective(Term("JS[0.5](o‖q)", div("JS", O, Q, param=0.5))),
         lambda r, c: r.token_mean(_js(r, 0.5))),
    Case("js_0.1", objective(Term("JS[0.1](o‖q)", div("JS", O, Q, param=0.1))),
         lambda r, c: r.token_mean(_js(r, 0.1))),
    Case("skl_0.1", objective(Term("SKL[0.1](o‖q)", div("SKL", O, Q, param=0.1))),
         lambda r, c: r.token_mean(r.kl(r.logp("o"), r.mix((0.1, r.logp("o")), (0.9, r.logp("q")))))),
    Case("srkl_0.1", objective(Term("SRKL[0.1](o‖q)", div("SRKL", O, Q, param=0.1))),
         lambda r, c: r.token_mean(r.kl(r.logp("q"), r.mix((0.1, r.logp("q")), (0.9, r.logp("o")))))),
    Case("tv", objective(Term("TV(o, q)", div("TV", O, Q))),
         lambda r, c: r.token_mean(r.tv(r.logp("o"), r.logp("q")))),
    Case("cross_entropy_and_entropy",
         objective(Term("H(o, q)", div("H", O, Q)), Term("0.1·H(q)", div("H", Q), coefficient=number(0.1))),
         lambda r, c: r.token_mean(r.cross_entropy(r.logp("o"), r.logp("q"))) + 0.1 * r.token_mean(r.entropy(r.logp("q")))),
    Case("temperature", objective(Term("KL(o[τ=2]‖q[τ=2])", div("KL", tempered("o", 2), tempered("q", 2)))),
         lambda r, c: r.token_mean(r.kl(r.logp("o", tau=2.0), r.logp("q", tau=2.0)))),
    Case("top_k", objective(Term("KL(o[top_k=3]‖q)", div("KL", ModelDist("o", top_k=3), Q))),
         lambda r, c: r.token_mean(r.kl(r.logp("o", top_k=3), r.logp("q")))),
    Case("mixture_first",
         objective(Term("KL(0.3·o + 0.7·q ‖ q)", div("KL", MixtureDist(((number(0.3), O), (number(0.7), Q))), Q))),
         lambda r, c: r.token_mean(r.kl(r.mix((0.3, r.logp("o")), (0.7, r.logp("q"))), r.logp("q")))),
    Case("token_weight",
         objective(Term("λ·KL(o‖q)", div("KL", O, Q), token_weight=Scalar(LAMBDA, span(1, 13, 6))),
                   definitions={"λ": FunctionDef("λ", ("t", "w"), LAMBDA, "token")}),
         lambda r, c: r.token_mean(r.kl(r.logp("o"), r.logp("q")), _lambda_weight(r))),
    Case("token_weight_student_position",
         objective(Term("(t/T)·q(w_t)·KL(q‖o)", div("KL", Q, O), token_weight=Scalar(RAMP))),
         lambda r, c: r.token_mean(r.kl(r.logp("q"), r.logp("o")),
                                   (r.position / r.length * torch.exp(r.token_logp(r.logp("q")))).detach())),
    Case("schedule",
         objective(Term("φ(epoch)·CE", div("CE"), coefficient=Scalar(PHI, span(1, 13, 8))),
                   definitions={"φ": FunctionDef("φ", ("epoch",), PHI, "schedule")}),
         lambda r, c: _phi(c) * r.token_mean(r.ce()), needs=("student",), call={"epoch": 1.5}),
    Case("piecewise_schedule",
         objective(Term("ψ(epoch)·KL(o‖q)", div("KL", O, Q), coefficient=Scalar(CLIPPED))),
         lambda r, c: (2.0 if c["epoch"] < 1 else max(0.0, 1 - c["epoch"] / 4)) * r.token_mean(r.kl(r.logp("o"), r.logp("q"))),
         call={"epoch": 2.0}),
    Case("three_terms",
         objective(Term("λ·KL(o‖q)", div("KL", O, Q), token_weight=Scalar(LAMBDA)),
                   Term("φ(epoch)·CE", div("CE"), coefficient=Scalar(PHI)),
                   Term("SKL[0.1](o‖q)", div("SKL", O, Q, param=0.1)),
                   definitions={"λ": FunctionDef("λ", ("t", "w"), LAMBDA, "token"),
                                "φ": FunctionDef("φ", ("epoch",), PHI, "schedule")}),
         lambda r, c: r.token_mean(r.kl(r.logp("o"), r.logp("q")), _lambda_weight(r)) + _phi(c) * r.token_mean(r.ce())
         + r.token_mean(r.kl(r.logp("o"), r.mix((0.1, r.logp("o")), (0.9, r.logp("q"))))),
         call={"epoch": 0.5}),
    Case("sequence_reduction",
         objective(Term("KL(o‖q)", div("KL", O, Q)), Term("CE", div("CE")), reduction="sequence"),
         lambda r, c: r.sequence_mean(r.kl(r.logp("o"), r.logp("q"))) + r.sequence_mean(r.ce())),
    Case("sequence_weight",
         objective(Term("ρ(w)·CE", div("CE"), sequence_weight=Scalar(RHO, span(1, 13, 4))),
                   settings={"rho.clip": 1.5}, definitions={"ρ": FunctionDef("ρ", ("w",), RHO, "sequence")}),
         lambda r, c: r.token_mean(r.ce(), torch.clamp(torch.exp(r.sequence_logp("ref") - r.sequence_logp("q")), max=1.5)
                                   .detach().unsqueeze(1).expand_as(r.position)),
         needs=("student", "ref")),
    Case("f_divergence_t_log_t", objective(Term("Df[t·log t](o‖q)", div("Df", O, Q, generator=T_LOG_T))),
         lambda r, c: r.token_mean(r.kl(r.logp("o"), r.logp("q")))),
    Case("f_divergence_chi2", objective(Term("Df[(t-1)²](o‖q)", div("Df", O, Q, generator=CHI2))),
         lambda r, c: r.token_mean(((torch.exp(r.logp("o")) - torch.exp(r.logp("q"))) ** 2 / torch.exp(r.logp("q"))).sum(-1))),
    Case("scheduled_mixture",
         objective(Term("KL(o ‖ α·o + (1-α)·q)", div("KL", O, MixtureDist(((Scalar(PROGRESS / 2), O), (Scalar(1 - PROGRESS / 2), Q)))))),
         lambda r, c: r.token_mean(r.kl(r.logp("o"), r.mix((c["progress"] / 2, r.logp("o")), (1 - c["progress"] / 2, r.logp("q"))))),
         call={"progress": 0.4}),
    Case("uld", objective(Term("ULD(q, o)", div("ULD", Q, O))),
         lambda r, c: r.token_mean(_uld(r.logp("q"), r.logp("o")))),
    Case("two_groups",
         objective(Term("E[d_q] KL(q‖o)", div("KL", Q, O), group=1), Term("E[d_data] CE", div("CE")),
                   groups=[DataSource(), MixtureSource(((number(0.5), StudentSource()), (number(0.5), DataSource())))]),
         lambda r, c: r.token_mean(r.kl(r.logp("q"), r.logp("o"))) + r.token_mean(r.ce())),
]

CASE_NAMES = [case.name for case in CASES]


def _uld(la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """L1 distance of the sorted probability vectors, the shorter one padded with zeros."""
    pa = torch.exp(la).sort(dim=-1, descending=True).values
    pb = torch.exp(lb).sort(dim=-1, descending=True).values
    width = max(pa.shape[-1], pb.shape[-1])
    pa = torch.nn.functional.pad(pa, (0, width - pa.shape[-1]))
    pb = torch.nn.functional.pad(pb, (0, width - pb.shape[-1]))
    return (pa - pb).abs().sum(-1)


def _js(r: Ref, beta: float) -> torch.Tensor:
    lo, lq = r.logp("o"), r.logp("q")
    m = r.mix((beta, lo), (1 - beta, lq))
    return beta * r.kl(lo, m) + (1 - beta) * r.kl(lq, m)


# --- Golden graphs --------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_NAMES)
def test_golden_graph(case: Case):
    text = ir.build(case.objective).format()
    path = GOLDEN_DIR / f"{case.name}.graph"
    if os.environ.get("KDSL_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"{path} is missing; run the tests with KDSL_UPDATE_GOLDEN=1 to create it"
    expected = path.read_text(encoding="utf-8")
    diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True), str(path), "built graph"))
    assert text == expected, f"graph differs from the golden file (KDSL_UPDATE_GOLDEN=1 rewrites it):\n{diff}"


def test_format_is_stable_across_builds():
    built = [ir.build(CASES[-1].objective).format() for _ in range(2)]
    assert built[0] == built[1]


def test_format_has_no_addresses_or_paths():
    text = ir.build(CASES[0].objective).format()
    assert "0x" not in text
    assert "spec.kd" not in text
    assert "  #" in text  # the line:col comment of a node with a span


# --- Sharing ------------------------------------------------------------------------------------


def test_one_log_softmax_for_five_terms():
    terms = [
        Term("KL(o‖q)", div("KL", O, Q)),
        Term("KL(q‖o)", div("KL", Q, O)),
        Term("CE", div("CE")),
        Term("TV(o, q)", div("TV", O, Q)),
        Term("H(q)", div("H", Q)),
    ]
    graph = ir.build(objective(*terms))
    softmaxes = [node for node in graph if node.op == "log_softmax"]
    assert sorted(node.name for node in softmaxes) == ["logp_o", "logp_q"]


def test_js_and_skl_share_their_mixture():
    graph = ir.build(objective(
        Term("JS[0.1](o‖q)", div("JS", O, Q, param=0.1)),
        Term("SKL[0.1](o‖q)", div("SKL", O, Q, param=0.1)),
    ))
    mixtures = [node for node in graph if node.op == "mixture"]
    assert [node.name for node in mixtures] == ["mix_0.1o_0.9q"]
    kls = [node.name for node in graph if node.op == "kl"]
    assert kls == ["kl_o_mix_0.1o_0.9q", "kl_q_mix_0.1o_0.9q"]  # SKL reuses the JS part


def test_temperatures_are_separate_distributions():
    graph = ir.build(objective(
        Term("KL(o‖q)", div("KL", O, Q)),
        Term("KL(o[τ=2]‖q[τ=2])", div("KL", tempered("o", 2), tempered("q", 2))),
    ))
    names = [node.name for node in graph if node.op == "log_softmax"]
    assert names == ["logp_o", "logp_q", "logp_o_tau2", "logp_q_tau2"]


def test_groups_do_not_share_nodes():
    graph = ir.build(CASES[-1].objective)
    groups = {node.name: node.group for node in graph}
    assert groups["logp_q"] == 0
    assert groups["logp_q_g1"] == 1


def test_vocab_shared_only_when_models_meet():
    assert ir.build(objective(Term("CE", div("CE")))).shared_vocab is False
    assert ir.build(objective(Term("KL(o‖q)", div("KL", O, Q)))).shared_vocab is True
    weighted_ce = objective(Term("o(w_t)·CE", div("CE"), token_weight=Scalar(sympy.exp(LOG_O_TOKEN))))
    assert ir.build(weighted_ce).shared_vocab is True


def test_projection_node_types():
    graph = ir.build(objective(Term("KL(o→q ‖ q)", div("KL", ProjectedDist("o"), Q))))
    projection = next(node for node in graph if node.op == "projection")
    assert str(projection.type) == "f32[B,T,Vs]"
    assert projection.named_input("teacher_hidden") == "o_hidden"


# --- Verifier -----------------------------------------------------------------------------------


def _graph():
    return ir.build(CASES[0].objective)


def test_verifier_rejects_unused_node():
    graph = _graph()
    nodes = list(graph.nodes)
    after_labels = next(i for i, node in enumerate(nodes) if node.name == "labels") + 1
    nodes.insert(after_labels, ir.Node("stray", "valid", ir.NodeType("bool", ("B", "T")), inputs=("labels",), group=0))
    broken = ir.Graph(nodes, graph.groups, graph.reduction, graph.shared_vocab)
    with pytest.raises(InternalError, match="%stray .*never used"):
        broken.verify()


def test_verifier_rejects_vocab_mismatch():
    graph = ir.build(objective(Term("CE", div("CE")), Term("H(o)", div("H", O))))
    assert not graph.shared_vocab
    bad_kl = ir.Node("bad_kl", "kl", ir.NodeType("f32", ("B", "T")), inputs=("logp_o", "logp_q"), group=0)
    bad_term = ir.Node("loss_bad", "token_mean", ir.NodeType("f32", ()), inputs=("bad_kl", "mask"),
                       attrs=(("name", "bad"),), group=0)
    total = replace(graph.output, inputs=graph.output.inputs + ("loss_bad",))
    broken = ir.Graph(graph.nodes[:-1] + [bad_kl, bad_term, total], graph.groups, graph.reduction, False)
    with pytest.raises(InternalError) as error:
        broken.verify()
    assert "%bad_kl" in str(error.value)
    assert "different vocabularies (%logp_o: Vt, %logp_q: Vs)" in str(error.value)
    assert "compiled graph:" in str(error.value)


def test_verifier_rejects_wrong_order():
    graph = _graph()
    nodes = list(reversed(graph.nodes))
    broken = ir.Graph(nodes, graph.groups, graph.reduction, graph.shared_vocab)
    with pytest.raises(InternalError, match="topological order"):
        broken.verify()


def test_verifier_rejects_wrong_type():
    graph = _graph()
    nodes = [replace(node, type=ir.NodeType("f32", ("B",))) if node.op == "kl" else node for node in graph.nodes]
    broken = ir.Graph(nodes, graph.groups, graph.reduction, graph.shared_vocab)
    with pytest.raises(InternalError, match=r"expected f32\[B,T\]"):
        broken.verify()


def test_verifier_message_names_node_and_prints_graph():
    graph = _graph()
    nodes = [replace(node, op="mystery") if node.op == "kl" else node for node in graph.nodes]
    broken = ir.Graph(nodes, graph.groups, graph.reduction, graph.shared_vocab)
    with pytest.raises(InternalError) as error:
        broken.verify()
    message = str(error.value)
    assert "%kl_o_q" in message
    assert "unknown op 'mystery'" in message
    assert "# kdsl graph v1" in message


# --- Graphs of shipped specs ------------------------------------------------------------------

# Specs whose objectives the hand-built table above does not cover: cross-vocabulary projections.
SPEC_GRAPHS = ["dskd"]


@pytest.mark.parametrize("spec", SPEC_GRAPHS)
def test_spec_golden_graph(spec: str):
    import kdsl

    root = Path(__file__).parent.parent
    objective = kdsl.load(str(root / "specs" / f"{spec}.kd"), same_vocab=False)
    graph = ir.build(objective)
    graph.verify()
    text = graph.format()
    path = GOLDEN_DIR / f"spec_{spec}.graph"
    if os.environ.get("KDSL_UPDATE_GOLDEN") == "1":
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"{path} is missing; run the tests with KDSL_UPDATE_GOLDEN=1 to create it"
    expected = path.read_text(encoding="utf-8")
    diff = "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True), str(path), "built graph"))
    assert text == expected, f"graph differs from the golden file (KDSL_UPDATE_GOLDEN=1 rewrites it):\n{diff}"


def test_projection_shared_across_terms():
    import kdsl

    objective = kdsl.load("objective = CE(o→q) + KL(o→q[τ=2] ‖ q[τ=2]) + KL(o ‖ q→o)", same_vocab=False)
    graph = ir.build(objective)
    projections = [node for node in graph if node.op == "projection"]
    assert sorted(node.attr("source") for node in projections) == ["o", "q"]
    temperatures = {node.attr("temperature") for node in graph if node.op == "log_softmax" and node.inputs[0] == projections[0].name}
    assert temperatures == {None, 2}
