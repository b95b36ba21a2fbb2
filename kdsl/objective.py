"""The typed, validated objective: what the checker produces and every later stage reads.

An objective is a list of terms. Each term is

    coefficient(epoch, step, progress) · token_weight(t, w) · sequence_weight(w) · loss

evaluated under one sampling distribution (its group). Coefficients, weights
and schedules are `Scalar`s: sympy expressions over the role symbols below,
built node by node from the parse tree. Distributions are typed by the
vocabulary they live on ("teacher" or "student").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

import sympy

from kdsl.errors import Diagnostic, Span

# Role symbols. User names are mapped onto these by the checker; no user text
# ever becomes a sympy name on its own.
POSITION = sympy.Symbol("t", positive=True, integer=True)  # 1-based position in the response
LENGTH = sympy.Symbol("T", positive=True, integer=True)  # response length
EPOCH = sympy.Symbol("epoch", nonnegative=True)  # fractional epoch, 0 at the start
STEP = sympy.Symbol("step", nonnegative=True, integer=True)  # optimizer step, 0 at the start
PROGRESS = sympy.Symbol("progress", nonnegative=True)  # step / total steps, in [0, 1]
# Log-probabilities of the token w_t under each model; `o(w_t)` is exp(LOG_O_TOKEN).
LOG_O_TOKEN = sympy.Symbol("log_o_wt", nonpositive=True)
LOG_Q_TOKEN = sympy.Symbol("log_q_wt", nonpositive=True)
# Log-probabilities of the whole response w; `ref(w)/q(w)` is exp(LOG_REF_SEQ - LOG_Q_SEQ).
LOG_O_SEQ = sympy.Symbol("log_o_w", nonpositive=True)
LOG_Q_SEQ = sympy.Symbol("log_q_w", nonpositive=True)
LOG_REF_SEQ = sympy.Symbol("log_ref_w", nonpositive=True)

SCHEDULE_ROLES = frozenset({EPOCH, STEP, PROGRESS})
TOKEN_ROLES = frozenset({POSITION, LENGTH, LOG_O_TOKEN, LOG_Q_TOKEN})
SEQUENCE_ROLES = frozenset({LOG_O_SEQ, LOG_Q_SEQ, LOG_REF_SEQ, LENGTH})
ALL_ROLES = SCHEDULE_ROLES | TOKEN_ROLES | SEQUENCE_ROLES


@dataclass(frozen=True)
class Scalar:
    """A real-valued expression over role symbols, with the span it came from."""

    expr: sympy.Expr
    span: Span | None = None

    @property
    def roles(self) -> frozenset[sympy.Symbol]:
        return frozenset(self.expr.free_symbols)

    @property
    def is_constant(self) -> bool:
        return not self.expr.free_symbols

    @property
    def is_schedule(self) -> bool:
        return bool(self.roles) and self.roles <= SCHEDULE_ROLES

    def evaluate(self, epoch: float = 0.0, step: int = 0, progress: float = 0.0) -> float:
        """Evaluate a constant or a schedule at one point of training."""
        extra = self.roles - SCHEDULE_ROLES
        if extra:
            names = ", ".join(sorted(str(s) for s in extra))
            raise ValueError(f"cannot evaluate {self.expr} as a schedule: it depends on {names}")
        value = self.expr.subs({EPOCH: epoch, STEP: step, PROGRESS: progress})
        return float(value)

    def __str__(self) -> str:
        return str(self.expr)


ONE = Scalar(sympy.Integer(1))


# --- Distributions over the next token -------------------------------------------------


@dataclass(frozen=True)
class ModelDist:
    """The teacher `o` or the student `q`, optionally with a temperature or top-k."""

    model: str  # "o" (teacher) or "q" (student)
    temperature: Scalar | None = None
    top_k: int | None = None
    span: Span | None = field(default=None, compare=False)

    @property
    def vocab(self) -> str:
        return "teacher" if self.model == "o" else "student"


@dataclass(frozen=True)
class ProjectedDist:
    """A model's distribution projected into the other vocabulary (Dual-Space KD)."""

    source: str  # "o" for o→q, "q" for q→o
    temperature: Scalar | None = None  # o→q[τ=2] divides the projected logits by τ
    span: Span | None = field(default=None, compare=False)

    @property
    def target(self) -> str:
        return "q" if self.source == "o" else "o"

    @property
    def vocab(self) -> str:
        return "student" if self.source == "o" else "teacher"


@dataclass(frozen=True)
class MixtureDist:
    """A convex mixture Σ c_i·D_i of distributions on one vocabulary, formed in probability space."""

    components: tuple[tuple[Scalar, "Dist"], ...]
    span: Span | None = field(default=None, compare=False)

    @property
    def vocab(self) -> str:
        return self.components[0][1].vocab


Dist = Union[ModelDist, ProjectedDist, MixtureDist]


# --- Losses at a position --------------------------------------------------------------

DIVERGENCE_KINDS = ("KL", "JS", "TV", "SKL", "SRKL", "Df", "H", "CE", "ULD")


@dataclass(frozen=True)
class Divergence:
    """One loss atom: a divergence between distributions, an entropy, CE or ULD.

    `param` is β for JS and α for SKL/SRKL. `generator` is the f of `Df[f]`
    as a sympy Lambda of one variable.
    """

    kind: str
    args: tuple[Dist, ...] = ()
    param: Scalar | None = None
    generator: sympy.Lambda | None = None
    span: Span | None = field(default=None, compare=False)

    def desugar(self) -> list[tuple[Scalar, "Divergence"]]:
        """Rewrite JS, SKL and SRKL as weighted KL terms over mixtures; others are returned as they are."""
        if self.kind == "SKL":
            a, b = self.args
            alpha = self.param.expr
            mix = MixtureDist(((Scalar(alpha), a), (Scalar(1 - alpha), b)))
            return [(ONE, Divergence("KL", (a, mix), span=self.span))]
        if self.kind == "SRKL":
            a, b = self.args
            alpha = self.param.expr
            mix = MixtureDist(((Scalar(alpha), b), (Scalar(1 - alpha), a)))
            return [(ONE, Divergence("KL", (b, mix), span=self.span))]
        if self.kind == "JS":
            a, b = self.args
            beta = self.param.expr
            mix = MixtureDist(((Scalar(beta), a), (Scalar(1 - beta), b)))
            return [
                (Scalar(beta), Divergence("KL", (a, mix), span=self.span)),
                (Scalar(1 - beta), Divergence("KL", (b, mix), span=self.span)),
            ]
        return [(ONE, self)]


# --- Sampling distributions over prefixes ----------------------------------------------


@dataclass(frozen=True)
class DataSource:
    """`d_data`: dataset responses, teacher-forced."""

    span: Span | None = field(default=None, compare=False)
    name: str = "d_data"


@dataclass(frozen=True)
class TeacherSource:
    """`d_o`: responses generated by the teacher."""

    span: Span | None = field(default=None, compare=False)
    name: str = "d_o"


@dataclass(frozen=True)
class StudentSource:
    """`d_q`: responses generated by the student being trained."""

    span: Span | None = field(default=None, compare=False)
    name: str = "d_q"


@dataclass(frozen=True)
class MixtureSource:
    """A mixture of sources; each draw picks one with these probabilities."""

    components: tuple[tuple[Scalar, "Source"], ...]
    per: str = "batch"  # "batch" or "sequence"
    span: Span | None = field(default=None, compare=False)


@dataclass(frozen=True)
class AdaptiveSource:
    """DistiLLM's adaptive student generation with a replay buffer."""

    student: "Source"
    data: "Source"
    params: tuple[tuple[str, Any], ...] = ()
    span: Span | None = field(default=None, compare=False)


Source = Union[DataSource, TeacherSource, StudentSource, MixtureSource, AdaptiveSource]


def source_has_labels(source: Source) -> bool:
    """Return whether every draw from `source` has ground-truth labels (CE is defined)."""
    if isinstance(source, (DataSource, TeacherSource)):
        return True
    if isinstance(source, StudentSource):
        return False
    if isinstance(source, MixtureSource):
        return all(source_has_labels(s) for _, s in source.components)
    if isinstance(source, AdaptiveSource):
        return source_has_labels(source.student) and source_has_labels(source.data)
    raise TypeError(f"unknown source {source!r}")


# --- The objective ---------------------------------------------------------------------


@dataclass(frozen=True)
class FunctionDef:
    """A user definition `name(args) = body` after validation."""

    name: str
    params: tuple[str, ...]
    body: sympy.Expr  # over role symbols, with settings substituted
    kind: str  # "token", "sequence", "schedule" or "constant"
    span: Span | None = None


@dataclass(frozen=True)
class Term:
    """One weighted loss atom under one sampling group."""

    name: str  # display name used as the key of `result.terms`
    loss: Divergence
    coefficient: Scalar = ONE  # constants and schedules only
    token_weight: Scalar | None = None  # per-token weight, evaluated without gradient
    sequence_weight: Scalar | None = None  # ρ(w), evaluated without gradient, in log space
    group: int = 0
    span: Span | None = field(default=None, compare=False)


@dataclass(frozen=True)
class EvalMetric:
    """One `eval` line: a metric name and its arguments."""

    name: str
    args: tuple[Any, ...] = ()
    span: Span | None = field(default=None, compare=False)


@dataclass
class Objective:
    """A validated spec: settings, definitions, terms, sampling groups and evaluation metrics."""

    terms: list[Term]
    groups: list[Source]
    settings: dict[str, Any]
    definitions: dict[str, FunctionDef] = field(default_factory=dict)
    evals: list[EvalMetric] = field(default_factory=list)
    reduction: str = "token"
    warnings: list[Diagnostic] = field(default_factory=list)
    path: str = "<string>"
    source_text: str = ""
    # The parsed spec (a `kdsl.ast.Spec`), kept for printers that show the user's names and term order.
    syntax: Any = field(default=None, repr=False, compare=False)

    def terms_of_group(self, group: int) -> list[Term]:
        return [term for term in self.terms if term.group == group]
